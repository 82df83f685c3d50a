"""Identity embeddings from the imported ArcFace recogniser (arcface_w600k_r50), for the embedding
swappers' source and for reference selection where it is installed.

Faces are cut on ArcFace's template (arcface_112_v2) at 112 px and scaled x / 127.5 - 1, RGB
(FaceFusion's face_recognizer.py). Two faces are taken for one person as FaceFusion's face selector
takes them: (1 - cosine similarity) / 2 of their embeddings below its default reference_face_distance.
"""

from __future__ import annotations

import numpy as np

from services.common.adaptive_batch import AdaptiveBatch
from services.common.errors import FailedPrecondition
from services.common.face_geometry import CropLayout
from services.common.face_model_catalog import ARCFACE, WARP_TEMPLATES, EmbedderSpec, PixelScaling
from services.common.model_runner import ModelCatalog, ModelRunner

EMBEDDER_INPUT = "input"
# FaceFusion's reference_face_distance default, on its (1 - cosine) / 2 scale.
SAME_PERSON_DISTANCE = 0.3
MAX_EMBED_BATCH = 64


def scaled_pixels(unit: np.ndarray, scaling: PixelScaling) -> np.ndarray:
    """Values in [0, 1] as a model's float32 input: (pixel - offset) / divisor."""
    pixels = unit.astype(np.float32) * np.float32(255.0)
    return ((pixels - np.float32(scaling.offset)) / np.float32(scaling.divisor)).astype(np.float32)


def unit_length(embeddings: np.ndarray) -> np.ndarray:
    lengths = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return (embeddings / np.maximum(lengths, np.float32(1e-12))).astype(np.float32)


def identity_distance(reference: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(1 - cosine) / 2 between a unit-length reference and each unit-length embedding: 0 same, 1 opposite."""
    return ((1.0 - embeddings @ reference) / 2.0).astype(np.float32)


class ArcFaceEmbedder:
    def __init__(
        self, models: ModelRunner, catalog: ModelCatalog, spec: EmbedderSpec = ARCFACE, max_batch: int = MAX_EMBED_BATCH
    ) -> None:
        self._models = models
        self._catalog = catalog
        self.spec = spec
        self.layout = CropLayout(spec.crop_size, WARP_TEMPLATES[spec.template])
        self._batches = AdaptiveBatch(spec.name, max_batch)
        self._output: str | None = None

    async def installed(self) -> bool:
        """Whether Triton serves the recogniser now (a set holding it may be imported at any time)."""
        return await self._catalog.is_model_ready(self.spec.name)

    async def embeddings(self, crops: np.ndarray) -> np.ndarray:
        """(n, 512) float32 raw embeddings of (n, 112, 112, 3) uint8 RGB faces cut on `layout`."""
        size = self.spec.crop_size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
            raise FailedPrecondition(
                f"model {self.spec.name} takes (n, {size}, {size}, 3) uint8 faces, got {crops.shape}"
            )
        if len(crops) == 0:
            return np.zeros((0, self.spec.embedding_size), np.float32)
        output = await self._output_name()

        async def embed(part: slice) -> np.ndarray:
            unit = crops[part].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
            answer = await self._models.infer(
                self.spec.name, {EMBEDDER_INPUT: scaled_pixels(unit, self.spec.scaling)}, (output,)
            )
            return self._checked(answer[output], len(unit))

        return np.concatenate(await self._batches.run(len(crops), embed))

    async def _output_name(self) -> str:
        """The recogniser's first output, named as its exporter named it."""
        if self._output is None:
            names = await self._catalog.output_names(self.spec.name)
            if not names:
                raise FailedPrecondition(f"model {self.spec.name} serves no outputs")
            self._output = names[0]
        return self._output

    def _checked(self, values: np.ndarray, count: int) -> np.ndarray:
        expected = (count, self.spec.embedding_size)
        if values.shape != expected:
            raise FailedPrecondition(f"model {self.spec.name} returned {values.shape}; expected {expected}")
        if not np.isfinite(values).all():
            raise FailedPrecondition(f"model {self.spec.name} returned NaN or Inf values")
        return np.asarray(values, np.float32)

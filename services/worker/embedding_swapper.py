"""Swappers conditioned on the source's identity embedding: inswapper_128 and hyperswap, as imported.

The source face is cut on ArcFace's template and embedded by the imported `arcface_w600k_r50`
(arcface_embedder); the swapper's own conversion (inswapper's emap projection, or hyperswap's unit
length), which the importer serves beside the swapper as `<swapper>_source`, turns the embedding into
the swapper's `source` input once per job. Target faces are cut on the swapper's template (arcface_128
at its crop size), scaled to its pixel range and swapped in batches; the swapped crop is blended back
through FaceFusion's default box mask (edges blurred over 15% of the side), as these models answer a
crop and no mask. Facts from FaceFusion's face_swapper/core.py, face_recognizer.py and face_masker.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from services.common.adaptive_batch import AdaptiveBatch
from services.common.errors import FailedPrecondition
from services.common.face_geometry import CropLayout
from services.common.face_model_catalog import (
    WARP_TEMPLATES,
    EmbeddingSwapperSpec,
    PixelScaling,
    fp32_twin_name,
    source_converter_name,
)
from services.common.fp32_fallback import infer_with_fp32_twin, non_finite_outputs
from services.common.model_runner import ModelCatalog, ModelRunner
from services.worker.arcface_embedder import ArcFaceEmbedder, scaled_pixels
from services.worker.face_swapper import (
    HOST_CROPS,
    MAX_SWAP_BATCH,
    CropCodec,
    SourceIdentity,
    SwappedFaces,
    check_crops,
    joined_parts,
    no_faces,
)

TARGET_INPUT = "target"
SOURCE_INPUT = "source"
CONVERTER_INPUT = "embedding"
CONVERTER_OUTPUT = "source"
# FaceFusion's default face_mask_blur: the box mask's edge is blurred over this share of half the side.
BOX_MASK_BLUR = 0.3


def box_mask(size: int, blur: float = BOX_MASK_BLUR) -> np.ndarray:
    """(size, size) float32 weights: 1 inside, 0 on a border of a quarter of the blur, Gaussian-feathered."""
    blur_pixels = int(size * 0.5 * blur)
    border = max(blur_pixels // 2, 1)
    mask = np.ones((size, size), np.float32)
    mask[:border, :] = 0
    mask[-border:, :] = 0
    mask[:, :border] = 0
    mask[:, -border:] = 0
    if blur_pixels == 0:
        return mask
    return np.asarray(cv2.GaussianBlur(mask, (0, 0), blur_pixels * 0.25), np.float32)


def unit_pixels(values: np.ndarray, scaling: PixelScaling) -> np.ndarray:
    """A model's float32 output mapped back to [0, 1] pixels (NaN and Inf kept, for the codec to find)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return (
            (values.astype(np.float32) * np.float32(scaling.divisor) + np.float32(scaling.offset)) / np.float32(255.0)
        ).astype(np.float32)


class EmbeddingSwapper:
    """An imported embedding-conditioned swapper over a model runner; names as `swapline models import` serves them."""

    def __init__(
        self,
        models: ModelRunner,
        catalog: ModelCatalog,
        spec: EmbeddingSwapperSpec,
        crops: CropCodec = HOST_CROPS,
        max_batch: int = MAX_SWAP_BATCH,
        embedder: ArcFaceEmbedder | None = None,
    ) -> None:
        self._models = models
        self._catalog = catalog
        self._spec = spec
        self._embedder = embedder if embedder is not None else ArcFaceEmbedder(models, catalog)
        self._crops = crops
        self._target_layout = CropLayout(spec.crop_size, WARP_TEMPLATES[spec.template])
        self._mask = box_mask(spec.crop_size)
        self._batches = AdaptiveBatch(spec.name, max_batch)
        self._outputs: dict[str, str] = {}

    @property
    def target_layout(self) -> CropLayout:
        return self._target_layout

    @property
    def source_layout(self) -> CropLayout:
        return self._embedder.layout

    async def _first_output(self, model: str) -> str:
        """The model's first output: the imported recogniser and hyperswap name theirs as their exporters did."""
        if model not in self._outputs:
            names = await self._catalog.output_names(model)
            if not names:
                raise FailedPrecondition(f"model {model} serves no outputs")
            self._outputs[model] = names[0]
        return self._outputs[model]

    async def prepare_source(self, source_crop: np.ndarray) -> SourceIdentity:
        """The swapper's `source` input for a face cut on the embedder's layout: embedding, then conversion."""
        check_crops(source_crop[None], "the source crop")
        embedding = await self._embedder.embeddings(source_crop[None])
        converter = source_converter_name(self._spec.name)
        converted = await self._models.infer(converter, {CONVERTER_INPUT: embedding}, (CONVERTER_OUTPUT,))
        source = self._checked_vector(converter, converted[CONVERTER_OUTPUT])
        return SourceIdentity(crop=np.ascontiguousarray(source_crop), embedding=source)

    def _checked_vector(self, model: str, values: np.ndarray) -> np.ndarray:
        size = self._embedder.spec.embedding_size
        if values.shape != (1, size):
            raise FailedPrecondition(f"model {model} returned {values.shape}; expected (1, {size})")
        if not np.isfinite(values).all():
            raise FailedPrecondition(f"model {model} returned NaN or Inf values for the source face")
        return np.ascontiguousarray(values[0], np.float32)

    async def swap(self, target_crops: Any, identity: SourceIdentity) -> SwappedFaces:
        count = len(target_crops)
        if count == 0:
            return no_faces(self._spec.crop_size)
        if identity.embedding is None:
            raise FailedPrecondition(f"swapper {self._spec.name} needs the source's embedding")
        embedding = identity.embedding
        output = await self._first_output(self._spec.name)

        async def swap_part(part: slice) -> tuple[Any, Any, int]:
            target = await asyncio.to_thread(self._crops.pack_target, target_crops[part])
            inputs = {
                TARGET_INPUT: scaled_pixels(target, self._spec.scaling),
                SOURCE_INPUT: np.ascontiguousarray(np.broadcast_to(embedding, (len(target), embedding.shape[0]))),
            }

            async def unpacked(model: str, answer: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
                return await asyncio.to_thread(self._unpack, model, answer[output], target.shape)

            (crops, masks), on_twin = await infer_with_fp32_twin(
                self._models, self._spec.name, fp32_twin_name(self._spec.name), inputs, (output,), unpacked
            )
            return crops, masks, int(on_twin)

        return joined_parts(await self._batches.run(count, swap_part), self._crops)

    def _unpack(self, model: str, swapped: np.ndarray, sent: tuple[int, ...]) -> tuple[Any, Any]:
        if swapped.shape != sent:
            raise FailedPrecondition(f"model {model} returned {swapped.shape} for target crops {sent}")
        if not np.isfinite(swapped).all():
            raise non_finite_outputs()
        masks = np.ascontiguousarray(np.broadcast_to(self._mask, (sent[0], 1, *self._mask.shape)))
        return self._crops.unpack(unit_pixels(swapped, self._spec.scaling), masks)

"""The swapper each job names, made once per name for the worker's life."""

from __future__ import annotations

from services.common.face_model_catalog import BUILT_IN_SWAPPER, EMBEDDING_SWAPPERS, checked_swapper
from services.common.model_runner import ModelCatalog, ModelRunner
from services.worker.arcface_embedder import ArcFaceEmbedder
from services.worker.embedding_swapper import EmbeddingSwapper
from services.worker.face_swapper import CropCodec, FaceSwapper


class SwapperRegistry:
    """The built-in swapper, or an imported embedding-conditioned one, on the worker's crop codec.

    Whether Triton serves a named model is found on its first request: an unknown model fails the chunk
    as FAILED_PRECONDITION naming it, which fails the job with that reason.
    """

    def __init__(
        self,
        built_in: FaceSwapper,
        models: ModelRunner,
        catalog: ModelCatalog,
        crops: CropCodec,
        arcface: ArcFaceEmbedder,
    ) -> None:
        self._built_in = built_in
        self._arcface = arcface
        self._models = models
        self._catalog = catalog
        self._crops = crops
        self._imported: dict[str, FaceSwapper] = {}

    def swapper(self, name: str) -> FaceSwapper:
        chosen = checked_swapper(name)
        if chosen == BUILT_IN_SWAPPER:
            return self._built_in
        if chosen not in self._imported:
            spec = EMBEDDING_SWAPPERS[chosen]
            self._imported[chosen] = EmbeddingSwapper(
                self._models, self._catalog, spec, self._crops, embedder=self._arcface
            )
        return self._imported[chosen]

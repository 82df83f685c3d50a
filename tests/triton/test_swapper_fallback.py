"""The swapper's FP32 fallback through the real tritonserver: a batch whose FP16 answer is poisoned with a
NaN runs again on face_swapper_fp32, which Triton serves from `make models`' FP32 build."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np

from services.common.triton_client import TritonClient
from services.triton.server_process import EmbeddedTriton
from services.worker.face_swapper import FACE_SWAPPER_MODEL, CropTransferSwapper, SwappedFaces
from tests.worker.face_photos import side_by_side

TIMEOUT_SECONDS = 60.0


class _PoisonedFp16:
    """Triton's answers, with a NaN planted in every FP16 face_swapper answer; records the models asked."""

    def __init__(self, client: TritonClient, poison: bool) -> None:
        self._client, self._poison = client, poison
        self.models: list[str] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.models.append(model)
        answer = dict(await self._client.infer(model, inputs, outputs))
        if self._poison and model == FACE_SWAPPER_MODEL:
            swapped = np.array(answer["swapped"])
            swapped[0, 0, 0, 0] = np.nan
            answer["swapped"] = swapped
        return answer


def _swap(url: str, poison: bool) -> tuple[SwappedFaces, list[str]]:
    photo, *_ = side_by_side()
    crops = np.stack([np.ascontiguousarray(photo[:256, :256]), np.ascontiguousarray(photo[100:356, 300:556])])

    async def run() -> tuple[SwappedFaces, list[str]]:
        client = TritonClient(url, TIMEOUT_SECONDS)
        try:
            models = _PoisonedFp16(client, poison)
            swapper = CropTransferSwapper(models)
            identity = await swapper.prepare_source(crops[1])
            return await swapper.swap(crops, identity), models.models
        finally:
            await client.close()

    return asyncio.run(run())


def test_a_poisoned_fp16_answer_is_swapped_again_by_the_served_fp32_twin(embedded_triton: EmbeddedTriton) -> None:
    clean, clean_models = _swap(embedded_triton.grpc_url, poison=False)
    fallen_back, models = _swap(embedded_triton.grpc_url, poison=True)

    assert (clean_models, clean.fp32_fallbacks) == (["face_swapper"], 0)
    assert (models, fallen_back.fp32_fallbacks) == (["face_swapper", "face_swapper_fp32"], 1)
    # The FP32 twin's crops are the FP16 model's within FP16's rounding.
    difference = np.abs(fallen_back.crops.astype(int) - clean.crops.astype(int))
    assert int(difference.max()) <= 3 and float(difference.mean()) < 0.5
    np.testing.assert_allclose(fallen_back.masks, clean.masks, atol=2e-3)

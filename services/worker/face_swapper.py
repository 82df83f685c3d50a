"""Swaps batches of aligned target crops to the source identity through a model runner (Triton).

`FaceSwapper` is the seam for model sets: the default `CropTransferSwapper` conditions on the
aligned source crop itself; an embedding-conditioned model (embedding_swapper.EmbeddingSwapper, for
inswapper_128 and hyperswap) prepares the source's identity embedding in `prepare_source` (kept in
`SourceIdentity.embedding`). Each says how it wants target and source faces cut (`CropLayout`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.common.adaptive_batch import AdaptiveBatch
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.face_geometry import CROP_SIZE, CropLayout
from services.common.fp32_fallback import infer_with_fp32_twin, non_finite_outputs
from services.common.model_runner import ModelRunner

log = logging.getLogger(__name__)

FACE_SWAPPER_MODEL = "face_swapper"
# Its FP32 twin (triton_models/face_swapper_fp32), for batches whose FP16 answer overflows.
FACE_SWAPPER_FP32_MODEL = "face_swapper_fp32"
SWAPPER_INPUTS = ("target", "source")
SWAPPER_OUTPUTS = ("swapped", "mask")
# The deployed model's max_batch_size: one request never carries more faces than this.
MAX_SWAP_BATCH = 64


@dataclass(frozen=True)
class SourceIdentity:
    """What a swapper needs of the source face, prepared once per job."""

    crop: np.ndarray  # (S, S, 3) uint8 RGB, aligned like the target crops
    embedding: np.ndarray | None = None  # identity embedding, for embedding-conditioned models


@dataclass(frozen=True)
class SwappedFaces:
    """(n, S, S, 3) uint8 swapped crops and (n, S, S) float32 masks in 0..1, where the face warper keeps
    crops (its CropCodec): numpy arrays on the host, or torch tensors on the warper's device."""

    crops: Any
    masks: Any
    # Requests run again on the FP32 twin because the FP16 answer held NaN or Inf.
    fp32_fallbacks: int = 0


class FaceSwapper(Protocol):
    @property
    def target_layout(self) -> CropLayout:
        """How target faces are cut for `swap`: the crop's size and where the five landmarks go."""
        ...

    @property
    def source_layout(self) -> CropLayout:
        """How the source face is cut for `prepare_source`."""
        ...

    async def prepare_source(self, source_crop: np.ndarray) -> SourceIdentity: ...

    async def swap(self, target_crops: Any, identity: SourceIdentity) -> SwappedFaces:
        """(n, S, S, 3) uint8 crops, where the face warper keeps them, swapped to the source identity."""
        ...


class CropCodec(Protocol):
    """Where crops live between the face warper and the swapper, and the conversions done there: crops to
    the model's FP16 `target` tensor, and the model's outputs back to crops and masks."""

    def pack_target(self, crops: Any) -> np.ndarray:
        """(n, S, S, 3) uint8 crops -> (n, 3, S, S) FP16 in [0, 1], contiguous on the host."""
        ...

    def unpack(self, swapped: np.ndarray, mask: np.ndarray) -> tuple[Any, Any]:
        """Checked outputs ((n, 3, S, S) and (n, 1, S, S), FP16 or FP32) -> uint8 (n, S, S, 3) crops and
        float32 (n, S, S) masks; a NaN or Inf anywhere is NonFiniteOutputs."""
        ...

    def join(self, parts: Sequence[Any]) -> Any:
        """The parts (crops, or masks) of one batch, answered in several requests, as one."""
        ...


def check_crops(crops: np.ndarray, what: str) -> None:
    if crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2] or crops.dtype != np.uint8:
        raise InvalidArgument(f"{what} must be (n, S, S, 3) uint8, got {crops.shape} {crops.dtype}")


# Packing and unpacking crops were a fifth of a worker's CPU on the H200 machine (six faces a frame: 29 ms on
# the CPU machine). Both go through lookup tables instead of arithmetic over every pixel: a uint8 pixel has
# 256 FP16 values in [0, 1], and an FP16 output has 65,536 bit patterns, each with its uint8 pixel, its mask
# weight and whether it is finite. The tables give exactly what the arithmetic gave.
_UNIT_FP16 = (np.arange(256, dtype=np.float32) / 255.0).astype(np.float16)
_FP16_VALUES = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_FP16_FINITE = np.isfinite(_FP16_VALUES)
with np.errstate(invalid="ignore", over="ignore"):
    _FP16_TO_PIXEL = np.clip(np.nan_to_num(_FP16_VALUES) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    _FP16_TO_WEIGHT = np.clip(np.nan_to_num(_FP16_VALUES), 0.0, 1.0).astype(np.float32)


class HostCropCodec:
    """Crops as numpy arrays on the host, converted through lookup tables."""

    def pack_target(self, crops: np.ndarray) -> np.ndarray:
        check_crops(crops, "target crops")
        # A lookup keeps its index's memory order: the result is made contiguous, as Triton sends it.
        return np.ascontiguousarray(_UNIT_FP16[crops.transpose(0, 3, 1, 2)])

    def unpack(self, swapped: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The deployed model answers FP16 (its config); another dtype takes the arithmetic path.
        if swapped.dtype == np.float16 and mask.dtype == np.float16:
            swapped_bits, mask_bits = swapped.view(np.uint16), mask.view(np.uint16)
            if not (_FP16_FINITE[swapped_bits].all() and _FP16_FINITE[mask_bits].all()):
                raise non_finite_outputs()
            crops = _FP16_TO_PIXEL[swapped_bits.transpose(0, 2, 3, 1)]
            return np.ascontiguousarray(crops), _FP16_TO_WEIGHT[mask_bits[:, 0]]
        if not (np.isfinite(swapped).all() and np.isfinite(mask).all()):
            raise non_finite_outputs()
        crops = np.clip(swapped.transpose(0, 2, 3, 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(crops), np.ascontiguousarray(np.clip(mask[:, 0], 0.0, 1.0))

    def join(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)


HOST_CROPS = HostCropCodec()


def swapper_inputs(target: np.ndarray, source_crop: np.ndarray) -> dict[str, np.ndarray]:
    """The model's inputs for a packed `target`: it, and the source crop as FP16 NCHW in [0, 1] once per face."""
    check_crops(source_crop[None], "the source crop")
    if source_crop.shape != (target.shape[2], target.shape[3], 3):
        raise InvalidArgument(f"source crop {source_crop.shape} does not match target crops {target.shape[2:]}")
    source = _UNIT_FP16[source_crop.transpose(2, 0, 1)]
    return {"target": target, "source": np.ascontiguousarray(np.broadcast_to(source[None], target.shape))}


def pack_swapper_inputs(target_crops: np.ndarray, source_crop: np.ndarray) -> dict[str, np.ndarray]:
    """RGB uint8 crops on the host -> the model's `target` and `source`: FP16 NCHW in [0, 1]."""
    return swapper_inputs(HOST_CROPS.pack_target(target_crops), source_crop)


def checked_swapper_outputs(
    outputs: Mapping[str, np.ndarray], model: str = FACE_SWAPPER_MODEL
) -> tuple[np.ndarray, np.ndarray]:
    """`swapped` (n,3,S,S) and `mask` (n,1,S,S), contiguous, FP16 where the model answered FP16, else FP32.

    Outputs of another layout are FailedPrecondition: the deployed model is not the one this code
    expects.
    """
    missing = [name for name in SWAPPER_OUTPUTS if outputs.get(name) is None]
    if missing:
        raise FailedPrecondition(f"model {model} returned no {', '.join(missing)} output")
    # FP16 answers (the deployed config's) stay FP16 for the codecs' fast paths; any other dtype becomes FP32.
    half = outputs["swapped"].dtype == np.float16 and outputs["mask"].dtype == np.float16
    swapped = np.ascontiguousarray(outputs["swapped"]) if half else np.asarray(outputs["swapped"], np.float32)
    mask = np.ascontiguousarray(outputs["mask"]) if half else np.asarray(outputs["mask"], np.float32)
    if swapped.ndim != 4 or swapped.shape[1] != 3 or mask.ndim != 4 or mask.shape[1] != 1:
        raise FailedPrecondition(
            f"model {model} returned swapped {swapped.shape} and mask {mask.shape}; "
            "expected (n, 3, S, S) and (n, 1, S, S)"
        )
    if swapped.shape[0] != mask.shape[0] or swapped.shape[2:] != mask.shape[2:]:
        raise FailedPrecondition(f"model {model} returned swapped {swapped.shape} but mask {mask.shape}")
    return swapped, mask


def unpack_swapper_outputs(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The swapper's outputs, checked, as uint8 (n,S,S,3) crops and float32 (n,S,S) masks on the host."""
    return HOST_CROPS.unpack(*checked_swapper_outputs(outputs))


def no_faces(size: int) -> SwappedFaces:
    return SwappedFaces(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.float32))


def joined_parts(parts: Sequence[tuple[Any, Any, int]], crops: CropCodec) -> SwappedFaces:
    """One batch's faces from the (crops, masks, fallbacks) of the requests it was answered in."""
    fallbacks = sum(fallback for _, _, fallback in parts)
    if len(parts) == 1:
        return SwappedFaces(parts[0][0], parts[0][1], fallbacks)
    return SwappedFaces(
        crops.join([crop for crop, _, _ in parts]), crops.join([mask for _, mask, _ in parts]), fallbacks
    )


class CropTransferSwapper:
    """The default swapper: Triton's `face_swapper` relights and blends the source crop onto each target.

    An out-of-memory answer halves the faces per request (AdaptiveBatch). A request whose FP16 answer
    holds NaN or Inf runs again on the FP32 twin (`fallback_model`); only if that overflows too does the
    chunk fail: pasting garbage into a video silently is worse.
    """

    def __init__(
        self,
        models: ModelRunner,
        max_batch: int = MAX_SWAP_BATCH,
        size: int = CROP_SIZE,
        crops: CropCodec = HOST_CROPS,
        model: str = FACE_SWAPPER_MODEL,
        fallback_model: str = FACE_SWAPPER_FP32_MODEL,
    ) -> None:
        self._models = models
        self._size = size
        self._layout = CropLayout(size)
        self._crops = crops
        self._model = model
        self._fallback_model = fallback_model
        self._batches = AdaptiveBatch(model, max_batch)

    @property
    def target_layout(self) -> CropLayout:
        return self._layout

    @property
    def source_layout(self) -> CropLayout:
        return self._layout

    @property
    def batch_limit(self) -> int:
        """Faces a request carries now: max_batch until the model runs out of memory."""
        return self._batches.limit

    async def prepare_source(self, source_crop: np.ndarray) -> SourceIdentity:
        check_crops(source_crop[None], "the source crop")
        return SourceIdentity(crop=np.ascontiguousarray(source_crop))

    async def swap(self, target_crops: Any, identity: SourceIdentity) -> SwappedFaces:
        count = len(target_crops)
        if count == 0:
            return no_faces(self._size)

        async def swap_part(part: slice) -> tuple[Any, Any, int]:
            # Packing and unpacking run off the event loop: on a GPU they wait for the device.
            target = await asyncio.to_thread(self._crops.pack_target, target_crops[part])
            inputs = swapper_inputs(target, identity.crop)

            async def unpacked(model: str, outputs: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
                return await self._unpacked(model, outputs, target.shape)

            (crops, masks), on_twin = await infer_with_fp32_twin(
                self._models, self._model, self._fallback_model, inputs, SWAPPER_OUTPUTS, unpacked
            )
            return crops, masks, int(on_twin)

        return joined_parts(await self._batches.run(count, swap_part), self._crops)

    async def _unpacked(self, model: str, outputs: Mapping[str, np.ndarray], sent: tuple[int, ...]) -> tuple[Any, Any]:
        swapped, mask = checked_swapper_outputs(outputs, model)
        if swapped.shape != sent:
            answered = swapped.shape
            raise FailedPrecondition(
                f"model {model} returned {answered[0]} crops of {answered[2]}x{answered[3]} "
                f"for {sent[0]} faces of {sent[2]}x{sent[3]}"
            )
        return await asyncio.to_thread(self._crops.unpack, swapped, mask)

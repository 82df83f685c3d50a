from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.common.errors import FailedPrecondition, ResourceExhausted
from services.common.fp32_fallback import NonFiniteOutputs
from services.common.model_runner import ModelRunner
from services.worker.face_swapper import (
    FACE_SWAPPER_MODEL,
    CropTransferSwapper,
    SourceIdentity,
    SwappedFaces,
    pack_swapper_inputs,
    unpack_swapper_outputs,
)

SIZE = 32


def _crops(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def test_pack_gives_fp16_nchw_in_unit_range_with_the_source_per_face() -> None:
    targets = _crops(3)
    source = _crops(1, seed=1)[0]
    packed = pack_swapper_inputs(targets, source)
    assert set(packed) == {"target", "source"}
    for tensor in packed.values():
        assert tensor.dtype == np.float16
        assert tensor.shape == (3, 3, SIZE, SIZE)
        assert tensor.flags.c_contiguous
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    # Channel 0 of face 1 is the red plane of that crop.
    np.testing.assert_allclose(packed["target"][1, 0], targets[1, :, :, 0] / 255.0, atol=1e-3)
    for face in range(3):
        np.testing.assert_allclose(packed["source"][face].transpose(1, 2, 0), source / 255.0, atol=1e-3)


def test_unpack_round_trips_packed_crops() -> None:
    targets = _crops(4)
    packed = pack_swapper_inputs(targets, targets[0])
    mask = np.full((4, 1, SIZE, SIZE), 0.25, np.float16)
    crops, masks = unpack_swapper_outputs({"swapped": packed["target"], "mask": mask})
    assert crops.dtype == np.uint8 and crops.shape == targets.shape
    assert int(np.abs(crops.astype(int) - targets.astype(int)).max()) <= 1
    assert masks.dtype == np.float32 and masks.shape == (4, SIZE, SIZE)
    np.testing.assert_allclose(masks, 0.25)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_unpack_rejects_nan_and_inf(bad: float) -> None:
    swapped = np.zeros((2, 3, SIZE, SIZE), np.float16)
    swapped[1, 2, 5, 5] = bad
    with pytest.raises(NonFiniteOutputs, match="NaN or infinite"):
        unpack_swapper_outputs({"swapped": swapped, "mask": np.ones((2, 1, SIZE, SIZE), np.float16)})


class _InvertingModels:
    """A ModelRunner whose face_swapper inverts the target; it runs out of memory above `memory_faces`."""

    def __init__(self, memory_faces: int = 1_000) -> None:
        self.memory_faces = memory_faces
        self.batches: list[int] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        assert model == FACE_SWAPPER_MODEL
        target = inputs["target"]
        count = target.shape[0]
        self.batches.append(count)
        if count > self.memory_faces:
            raise ResourceExhausted("triton model face_swapper: out of memory")
        return {
            "swapped": (1.0 - target.astype(np.float32)).astype(np.float16),
            "mask": np.ones((count, 1, *target.shape[2:]), np.float16),
        }


def _swapped(models: ModelRunner, crops: np.ndarray) -> SwappedFaces:
    swapper = CropTransferSwapper(models, size=SIZE)
    identity = asyncio.run(swapper.prepare_source(crops[0]))
    return asyncio.run(swapper.swap(crops, identity))


def _swap(models: ModelRunner, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    swapped = _swapped(models, crops)
    return swapped.crops, swapped.masks


def test_all_faces_go_in_one_request_up_to_the_model_batch() -> None:
    models = _InvertingModels()
    crops = _crops(40)
    swapped, masks = _swap(models, crops)
    assert models.batches == [40]
    assert int(np.abs(swapped.astype(int) - (255 - crops.astype(int))).max()) <= 1
    assert masks.shape == (40, SIZE, SIZE)


def test_more_faces_than_the_model_batch_are_split_at_64() -> None:
    models = _InvertingModels()
    crops = _crops(70)
    swapped, _ = _swap(models, crops)
    assert models.batches == [64, 6]
    assert int(np.abs(swapped.astype(int) - (255 - crops.astype(int))).max()) <= 1


def test_out_of_memory_halves_the_batch_and_keeps_order() -> None:
    models = _InvertingModels(memory_faces=10)
    crops = _crops(24)
    swapped, _ = _swap(models, crops)
    assert models.batches == [24, 12, 6, 6, 6, 6]
    assert int(np.abs(swapped.astype(int) - (255 - crops.astype(int))).max()) <= 1


def test_out_of_memory_at_one_face_fails() -> None:
    models = _InvertingModels(memory_faces=0)
    with pytest.raises(ResourceExhausted):
        _swap(models, _crops(4))
    assert models.batches == [4, 2, 1]


def test_no_faces_needs_no_request() -> None:
    models = _InvertingModels()
    swapper = CropTransferSwapper(models, size=SIZE)
    identity = SourceIdentity(crop=_crops(1)[0])
    swapped_faces = asyncio.run(swapper.swap(np.zeros((0, SIZE, SIZE, 3), np.uint8), identity))
    swapped, masks = swapped_faces.crops, swapped_faces.masks
    assert swapped.shape == (0, SIZE, SIZE, 3) and masks.shape == (0, SIZE, SIZE)
    assert models.batches == []


class _MalformedModels:
    """A face_swapper that answers with the given outputs whatever it is asked."""

    def __init__(self, answer: dict[str, np.ndarray]) -> None:
        self.answer = answer

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        return self.answer


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (
            {"swapped": np.zeros((0, 3, SIZE, SIZE), np.float16), "mask": np.zeros((0, 1, SIZE, SIZE), np.float16)},
            "0 crops of 32x32 for 3 faces",
        ),
        (
            {"swapped": np.zeros((3, 3, 16, 16), np.float16), "mask": np.zeros((3, 1, 16, 16), np.float16)},
            "crops of 16x16 for 3 faces of 32x32",
        ),
        (
            {"swapped": np.zeros((3, SIZE, SIZE, 3), np.float16), "mask": np.zeros((3, SIZE, SIZE), np.float16)},
            r"expected \(n, 3, S, S\)",
        ),
        ({"swapped": np.zeros((3, 3, SIZE, SIZE), np.float16)}, "no mask output"),
    ],
    ids=["empty", "wrong-size", "wrong-layout", "missing-output"],
)
def test_a_swapper_answer_of_the_wrong_shape_fails_naming_the_model(
    answer: dict[str, np.ndarray], problem: str
) -> None:
    with pytest.raises(FailedPrecondition, match=f"model face_swapper returned .*{problem}"):
        _swap(_MalformedModels(answer), _crops(3))


def test_the_lookup_tables_give_what_the_arithmetic_gives_for_every_fp16_value() -> None:
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(16, 1, 64, 62)  # all 63,488 finite values
    swapped = np.concatenate([finite] * 3, axis=1)
    crops, masks = unpack_swapper_outputs({"swapped": swapped, "mask": finite})
    as_float = swapped.astype(np.float32)
    assert np.array_equal(crops, np.clip(as_float.transpose(0, 2, 3, 1) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    assert np.array_equal(masks, np.clip(finite.astype(np.float32)[:, 0], 0.0, 1.0))
    assert crops.flags.c_contiguous and masks.dtype == np.float32


def test_packing_gives_what_the_arithmetic_gives_for_every_pixel_value() -> None:
    crops = np.arange(256, dtype=np.uint8)[None, :, None, None] * np.ones((2, 256, 256, 3), np.uint8)
    packed = pack_swapper_inputs(crops, crops[1])
    expected = (crops.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).astype(np.float16)
    assert np.array_equal(packed["target"], expected) and packed["target"].flags.c_contiguous
    assert np.array_equal(packed["source"], np.broadcast_to(expected[1], expected.shape))


def test_one_nan_among_fp16_outputs_is_still_found() -> None:
    swapped = np.zeros((1, 3, SIZE, SIZE), np.float16)
    swapped[0, 2, 5, 7] = np.nan
    with pytest.raises(NonFiniteOutputs, match="NaN or infinite"):
        unpack_swapper_outputs({"swapped": swapped, "mask": np.ones((1, 1, SIZE, SIZE), np.float16)})


class _OverflowingModels:
    """face_swapper answers NaN for requests holding a face whose first pixel is `poison`; its FP32 twin
    inverts, unless `twin_overflows`. Records (model, faces, input dtype) per request."""

    def __init__(self, poison: int, twin_overflows: bool = False) -> None:
        self.poison, self.twin_overflows = poison, twin_overflows
        self.requests: list[tuple[str, int, str]] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        target = inputs["target"]
        self.requests.append((model, len(target), str(target.dtype)))
        swapped = 1.0 - target.astype(np.float32)
        poisoned = model == FACE_SWAPPER_MODEL or self.twin_overflows
        if poisoned and (np.round(target[:, 0, 0, 0].astype(np.float32) * 255) == self.poison).any():
            swapped[:, 1, 2, 3] = np.nan
        dtype = target.dtype
        return {"swapped": swapped.astype(dtype), "mask": np.ones((len(target), 1, *target.shape[2:]), dtype)}


def test_an_fp16_overflow_runs_that_request_again_on_the_fp32_twin_and_counts_it() -> None:
    crops = _crops(70)
    crops[:, 0, 0, 0] = 100
    crops[66, 0, 0, 0] = 7  # in the second request of 64 + 6
    models = _OverflowingModels(poison=7)
    swapped = _swapped(models, crops)
    assert models.requests == [
        (FACE_SWAPPER_MODEL, 64, "float16"),
        (FACE_SWAPPER_MODEL, 6, "float16"),
        ("face_swapper_fp32", 6, "float32"),
    ]
    assert swapped.fp32_fallbacks == 1
    assert int(np.abs(swapped.crops.astype(int) - (255 - crops.astype(int))).max()) <= 1


def test_an_overflow_in_the_fp32_twin_too_fails_naming_it() -> None:
    crops = _crops(3)
    crops[:, 0, 0, 0] = 100
    crops[1, 0, 0, 0] = 7
    with pytest.raises(
        FailedPrecondition, match="model face_swapper_fp32 returned NaN or infinite values, as its FP16 build"
    ):
        _swap(_OverflowingModels(poison=7, twin_overflows=True), crops)

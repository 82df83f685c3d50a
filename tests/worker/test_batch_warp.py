"""The torch batch warp against the OpenCV one it stands in for, on CPU tensors and real photos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import lru_cache

import cv2
import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.face_types import DetectedFace
from services.common.fp32_fallback import NonFiniteOutputs
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import nv12_to_rgb, rgb_to_nv12
from services.worker.batch_warp import (
    DeviceAlignedFaces,
    DeviceCropCodec,
    TorchFaceWarper,
    align_batch,
    crop_to_frame,
    nv12_to_rgb_tensor,
    paste_batch,
    rgb_to_nv12_tensor,
    rgb_to_yuv_tables,
    shrink_batch,
)
from services.worker.chunk_pipeline import HOST_WARPER, ChunkStats, FaceWarper, run_chunk_pipeline
from services.worker.face_aligner import (
    Cv2FaceWarper,
    HostAlignedFaces,
    alignment_matrix,
    downscale_frames,
    even_box,
    paste_back,
    paste_region,
    warp_to_crop,
)
from services.worker.face_selector import FaceSelection
from services.worker.face_swapper import HOST_CROPS, CropTransferSwapper, SourceIdentity
from tests.worker.face_photos import face_from_landmarks, side_by_side

SIZE = 128
# (degrees, scale, shift x, shift y) of the astronaut-and-Grace-Hopper frame, about its centre. The
# last pushes the astronaut's face over the left edge, so her crop is partly mirrored from inside.
POSES = (
    (0.0, 1.0, 0.0, 0.0),
    (35.0, 0.9, 20.0, 10.0),
    (-70.0, 1.1, -10.0, 30.0),
    (180.0, 0.8, 0.0, 0.0),
    (10.0, 1.3, -100.0, 40.0),
)
BORDER_FRAME = len(POSES) - 1


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    error = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


@lru_cache(maxsize=1)
def _scenes() -> tuple[np.ndarray, list[int], np.ndarray]:
    """(frames (5, 600, 1024, 3), the slot of each face, each face's frame -> crop matrix): two faces a frame."""
    photo, *faces = side_by_side()
    height, width = photo.shape[:2]
    frames: list[np.ndarray] = []
    slots: list[int] = []
    matrices: list[np.ndarray] = []
    for slot, (degrees, scale, dx, dy) in enumerate(POSES):
        pose = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, scale) + np.array([[0, 0, dx], [0, 0, dy]])
        frames.append(cv2.warpAffine(photo, pose, (width, height), borderMode=cv2.BORDER_REFLECT))
        for landmarks in faces:
            slots.append(slot)
            matrices.append(alignment_matrix(landmarks @ pose[:, :2].T + pose[:, 2], SIZE))
    return np.stack(frames), slots, np.stack(matrices)


def _crop_footprint(matrix: np.ndarray) -> np.ndarray:
    """The frame positions of the crop's corner pixels."""
    corners = np.array([[0, 0], [SIZE - 1, 0], [0, SIZE - 1], [SIZE - 1, SIZE - 1]], np.float64)
    inverse = cv2.invertAffineTransform(matrix)
    mapped: np.ndarray = corners @ inverse[:, :2].T + inverse[:, 2]
    return mapped


def _swapped_crops(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured crops of a different hue each, and a feathered disc for a mask, so overlaps show their order."""
    rng = np.random.default_rng(7)
    hues = rng.integers(0, 256, (count, 1, 1, 3))
    texture = rng.integers(-40, 40, (count, SIZE, SIZE, 1))
    crops = np.clip(hues + texture, 0, 255).astype(np.uint8)
    ys, xs = np.mgrid[:SIZE, :SIZE]
    disc = np.clip((0.45 * SIZE - np.hypot(xs - SIZE / 2, ys - SIZE / 2)) / (0.1 * SIZE), 0.0, 1.0)
    return crops, np.repeat(disc[None].astype(np.float32), count, axis=0)


def _pasted_by_cv2(
    frames: np.ndarray, slots: list[int], matrices: np.ndarray, crops: np.ndarray, masks: np.ndarray
) -> np.ndarray:
    pasted = frames.copy()
    for slot, matrix, crop, mask in zip(slots, matrices, crops, masks, strict=True):
        paste_back(pasted[slot], crop, mask, matrix)
    return pasted


def _region_mask(frames: np.ndarray, slots: list[int], matrices: np.ndarray) -> np.ndarray:
    """(n, H, W) True inside any face's paste region."""
    inside = np.zeros(frames.shape[:3], bool)
    for slot, matrix in zip(slots, matrices, strict=True):
        box = paste_region(matrix, SIZE, frames.shape[1], frames.shape[2])
        if box is not None:
            x0, y0, x1, y1 = box
            inside[slot, y0:y1, x0:x1] = True
    return inside


def _overlapping_faces() -> tuple[list[int], np.ndarray]:
    """Every face of the scenes, plus a third face in frame 0 overlapping the astronaut's by half."""
    _, slots, matrices = _scenes()
    shifted = matrices[0].copy()
    shifted[:, 2] += matrices[0][:, :2] @ np.array([45.0, 25.0], np.float32)
    return [0, *slots], np.concatenate([shifted[None], matrices])


def test_aligned_crops_match_opencv_across_rotations_and_the_frame_edge() -> None:
    frames, slots, matrices = _scenes()

    crops = align_batch(torch.from_numpy(frames), slots, matrices, SIZE).numpy()

    assert crops.shape == (len(slots), SIZE, SIZE, 3) and crops.dtype == np.uint8
    for face, (slot, matrix) in enumerate(zip(slots, matrices, strict=True)):
        expected = warp_to_crop(frames[slot], matrix, SIZE)
        assert psnr(crops[face], expected) > 35.0, f"face {face}"
    # The border face's crop straddles the frame's left edge, so the mirroring was exercised.
    footprint_x = _crop_footprint(matrices[slots.index(BORDER_FRAME)])[:, 0]
    assert footprint_x.min() < -SIZE / 2 and footprint_x.max() > SIZE / 2


def test_faces_are_cut_from_their_own_frames_when_frames_hold_none_or_several() -> None:
    frames, slots, matrices = _scenes()
    # Frames 1 and 3 hold no face; frame 4 holds three, one of them twice.
    chosen = [0, 4, 5, 8, 9, 8]
    picked_slots = [slots[face] for face in chosen]

    crops = align_batch(torch.from_numpy(frames), picked_slots, matrices[chosen], SIZE).numpy()

    for crop, slot, matrix in zip(crops, picked_slots, matrices[chosen], strict=True):
        assert psnr(crop, warp_to_crop(frames[slot], matrix, SIZE)) > 35.0
    np.testing.assert_array_equal(crops[3], crops[5])


def test_pasted_frames_match_opencv_and_change_nothing_outside_the_faces_regions() -> None:
    frames, _, _ = _scenes()
    slots, matrices = _overlapping_faces()
    crops, masks = _swapped_crops(len(slots))
    expected = _pasted_by_cv2(frames, slots, matrices, crops, masks)

    pasted = paste_batch(
        torch.from_numpy(frames.copy()), slots, matrices, torch.from_numpy(crops), torch.from_numpy(masks)
    ).numpy()

    inside = _region_mask(frames, slots, matrices)
    np.testing.assert_array_equal(pasted[~inside], frames[~inside])
    assert psnr(pasted[inside], expected[inside]) > 40.0
    assert psnr(pasted, expected) > 40.0
    # The comparison means something: the paste changed the regions far beyond the difference allowed.
    assert psnr(expected[inside], frames[inside]) < 25.0


def test_overlapping_faces_of_one_frame_are_blended_in_order() -> None:
    frames, _, _ = _scenes()
    slots, matrices = _overlapping_faces()
    crops, masks = _swapped_crops(len(slots))
    in_order = _pasted_by_cv2(frames, slots, matrices, crops, masks)
    swapped_first_two = [1, 0, *range(2, len(slots))]
    reversed_order = _pasted_by_cv2(
        frames,
        [slots[face] for face in swapped_first_two],
        matrices[swapped_first_two],
        crops[swapped_first_two],
        masks[swapped_first_two],
    )
    overlap = np.any(in_order[0] != reversed_order[0], axis=-1)
    assert overlap.sum() > 500

    pasted = paste_batch(
        torch.from_numpy(frames.copy()), slots, matrices, torch.from_numpy(crops), torch.from_numpy(masks)
    ).numpy()

    assert psnr(pasted[0][overlap], in_order[0][overlap]) > 40.0
    assert psnr(pasted[0][overlap], reversed_order[0][overlap]) < 25.0


def test_a_face_at_the_edge_is_clipped_and_one_wholly_outside_changes_nothing() -> None:
    frames, slots, matrices = _scenes()
    border_face = slots.index(BORDER_FRAME)
    outside = matrices[border_face].copy()
    outside[:, 2] += outside[:, :2] @ np.array([-2000.0, 0.0], np.float32)
    chosen_slots, chosen = [BORDER_FRAME, BORDER_FRAME], np.stack([matrices[border_face], outside])
    assert paste_region(outside, SIZE, frames.shape[1], frames.shape[2]) is None
    box = paste_region(chosen[0], SIZE, frames.shape[1], frames.shape[2])
    assert box is not None and box[0] == 0
    crops, masks = _swapped_crops(2)
    expected = _pasted_by_cv2(frames, chosen_slots, chosen, crops, masks)

    pasted = paste_batch(
        torch.from_numpy(frames.copy()), chosen_slots, chosen, torch.from_numpy(crops), torch.from_numpy(masks)
    ).numpy()

    assert psnr(pasted[BORDER_FRAME], expected[BORDER_FRAME]) > 40.0
    assert not np.array_equal(pasted[BORDER_FRAME], frames[BORDER_FRAME])
    np.testing.assert_array_equal(pasted[:BORDER_FRAME], frames[:BORDER_FRAME])


def test_the_torch_warper_writes_back_only_the_faces_regions_of_the_host_frames() -> None:
    frames, _, _ = _scenes()
    slots, matrices = _overlapping_faces()
    crops, _ = _swapped_crops(len(slots))
    # Whole crops, so the paste reaches the last row and column of every region.
    masks = np.ones((len(slots), SIZE, SIZE), np.float32)
    expected = _pasted_by_cv2(frames, slots, matrices, crops, masks)
    host = frames.copy()

    aligned = TorchFaceWarper("cpu").align(host, slots, matrices, SIZE)
    # Alignment leaves the host frames as they were; the paste lands in them.
    np.testing.assert_array_equal(host, frames)
    pasted = aligned.paste(crops, masks)

    assert pasted is host
    assert aligned.crops.shape == (len(slots), SIZE, SIZE, 3)
    assert psnr(aligned.crops[1].numpy(), warp_to_crop(frames[slots[1]], matrices[1], SIZE)) > 35.0
    on_device = paste_batch(
        torch.from_numpy(frames.copy()), slots, matrices, torch.from_numpy(crops), torch.from_numpy(masks)
    ).numpy()
    np.testing.assert_array_equal(pasted, on_device)
    inside = _region_mask(frames, slots, matrices)
    np.testing.assert_array_equal(pasted[~inside], frames[~inside])
    assert psnr(pasted[inside], expected[inside]) > 40.0


def test_the_torch_warper_copies_read_only_frames_and_passes_faceless_batches_through() -> None:
    frames, slots, matrices = _scenes()
    read_only = frames.copy()
    read_only.flags.writeable = False
    crops, masks = _swapped_crops(2)

    pasted = TorchFaceWarper("cpu").align(read_only, slots[:2], matrices[:2], SIZE).paste(crops, masks)
    untouched = TorchFaceWarper("cpu").align(frames, [], matrices[:0], SIZE)

    assert pasted is not read_only and not np.array_equal(pasted[0], frames[0])
    np.testing.assert_array_equal(read_only, frames)
    assert untouched.crops.shape == (0, SIZE, SIZE, 3)
    assert untouched.paste(crops[:0], masks[:0]) is frames


def test_frames_must_be_contiguous_rgb_bytes() -> None:
    frames = torch.zeros((2, 8, 8, 3), dtype=torch.uint8)
    matrices = np.array([[[1, 0, 0], [0, 1, 0]]], np.float32)
    with pytest.raises(InvalidArgument, match="contiguous"):
        align_batch(frames.transpose(1, 2), [0], matrices, 4)
    with pytest.raises(InvalidArgument, match="uint8"):
        align_batch(frames.float(), [0], matrices, 4)


PIPELINE_FRAMES = 7
PIPELINE_BATCH = 3
FACELESS_FRAME = 4


def _pipeline_scene(index: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Frame `index` of a clip panning over the two photos at half size; its index in the top-left pixel."""
    photo, *faces = side_by_side()
    pose = np.array([[0.5, 0.0, 3.0 * index], [0.0, 0.5, -2.0 * index]], np.float32)
    frame = cv2.warpAffine(photo, pose, (512, 300), borderMode=cv2.BORDER_REFLECT)
    frame[0, 0] = index
    return frame, [landmarks @ pose[:, :2].T + pose[:, 2] for landmarks in faces]


class _PanningClip:
    async def __aiter__(self) -> AsyncIterator[tuple[Frames, Sequence[int]]]:
        for start in range(0, PIPELINE_FRAMES, PIPELINE_BATCH):
            indices = list(range(start, min(start + PIPELINE_BATCH, PIPELINE_FRAMES)))
            yield np.stack([_pipeline_scene(index)[0] for index in indices]), indices


class _BothFaces:
    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        indices = [int(frame[0, 0, 0]) for frame in frames]
        return [
            [] if index == FACELESS_FRAME else [face_from_landmarks(points) for points in _pipeline_scene(index)[1]]
            for index in indices
        ]


class _InvertingModel:
    """A face_swapper model answering 1 - target, with a mask that fades towards the crop's edges."""

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        target = inputs["target"]
        _, masks = _swapped_crops(len(target))
        return {"swapped": (1.0 - target).astype(np.float16), "mask": masks[:, None].astype(np.float16)}


class _Collected:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    async def write(self, frames: Frames) -> None:
        self.frames.extend(frame.copy() for frame in frames)

    async def close(self) -> int:
        return len(self.frames)


def _run_pipeline(warper: FaceWarper) -> tuple[ChunkStats, list[np.ndarray]]:
    sink = _Collected()
    identity = SourceIdentity(crop=np.zeros((SIZE, SIZE, 3), np.uint8))
    # The swapper converts crops where the warper keeps them: on the host for OpenCV, as tensors for torch.
    swapper = CropTransferSwapper(_InvertingModel(), size=SIZE, crops=warper.crop_codec)
    pipeline = run_chunk_pipeline(
        _PanningClip(), _BothFaces(), swapper, identity, sink, FaceSelection("many"), warper=warper
    )
    return asyncio.run(asyncio.wait_for(pipeline, timeout=30)), sink.frames


def test_the_chunk_pipeline_gives_the_same_video_with_the_torch_warper_as_with_opencv() -> None:
    host_stats, host_frames = _run_pipeline(HOST_WARPER)
    torch_stats, torch_frames = _run_pipeline(TorchFaceWarper("cpu"))

    assert len(torch_frames) == len(host_frames) == PIPELINE_FRAMES
    assert (torch_stats.frames, torch_stats.faces) == (host_stats.frames, host_stats.faces) == (7, 12)
    assert torch_stats.face_count_changes == host_stats.face_count_changes
    for index, (on_torch, on_host) in enumerate(zip(torch_frames, host_frames, strict=True)):
        original = _pipeline_scene(index)[0]
        if index == FACELESS_FRAME:
            np.testing.assert_array_equal(on_torch, original)
            continue
        assert psnr(on_torch, on_host) > 40.0, f"frame {index}"
        assert psnr(on_torch, original) < 25.0, f"frame {index} was not swapped"


def test_shrinking_on_torch_takes_opencvs_area_means() -> None:
    frames, _, _ = _scenes()
    on_torch = shrink_batch(torch.from_numpy(frames), (256, 150)).numpy()
    by_cv2 = downscale_frames(frames, (256, 150))
    # Whole-number factors (4 here): the same box means, rounded alike but for float summation order.
    assert on_torch.shape == by_cv2.shape == (5, 150, 256, 3)
    assert int(np.abs(on_torch.astype(int) - by_cv2.astype(int)).max()) <= 1
    # Other factors: torch's bins take whole border pixels where OpenCV weighs them by their overlap.
    assert psnr(shrink_batch(torch.from_numpy(frames), (300, 176)).numpy(), downscale_frames(frames, (300, 176))) > 30.0
    assert shrink_batch(torch.from_numpy(frames), (1024, 600)).data_ptr() == torch.from_numpy(frames).data_ptr()


def test_the_torch_warper_aligns_the_frames_it_uploaded_to_shrink_and_keeps_no_more_than_its_limit() -> None:
    frames, slots, matrices = _scenes()
    warper = TorchFaceWarper("cpu", resident_batches=2)
    small = warper.shrink(frames, (256, 150))
    assert warper.resident_batches == 1
    np.testing.assert_array_equal(small, shrink_batch(torch.from_numpy(frames), (256, 150)).numpy())

    aligned = warper.align(frames, slots, matrices, SIZE)
    fresh = TorchFaceWarper("cpu").align(frames.copy(), slots, matrices, SIZE)
    assert isinstance(aligned, DeviceAlignedFaces) and isinstance(fresh, DeviceAlignedFaces)
    assert warper.resident_batches == 0
    assert torch.equal(aligned.crops, fresh.crops)

    batches = [frames[:2].copy() for _ in range(4)]
    for batch in batches:
        warper.shrink(batch, (256, 150))
    assert warper.resident_batches == 2
    # A batch dropped from the device is uploaded again when it is aligned.
    again = warper.align(batches[0], slots[:2], matrices[:2], SIZE)
    assert isinstance(again, DeviceAlignedFaces)
    assert torch.equal(again.crops, fresh.crops[:2]) and warper.resident_batches == 2


def test_the_device_codec_converts_exactly_as_the_host_tables_do() -> None:
    codec = DeviceCropCodec(torch.device("cpu"))
    pixels = np.arange(256, dtype=np.uint8)[None, :, None, None] * np.ones((1, 256, 256, 3), np.uint8)
    assert np.array_equal(codec.pack_target(torch.from_numpy(pixels)), HOST_CROPS.pack_target(pixels))
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(16, 1, 64, 62)
    swapped = np.concatenate([finite] * 3, axis=1)
    on_device, host = codec.unpack(swapped, finite), HOST_CROPS.unpack(swapped, finite)
    assert np.array_equal(on_device[0].numpy(), host[0]) and np.array_equal(on_device[1].numpy(), host[1])
    as_float = codec.unpack(swapped.astype(np.float32), finite.astype(np.float32))
    assert np.array_equal(as_float[0].numpy(), host[0])
    assert torch.equal(codec.join([on_device[1][:3], on_device[1][3:]]), on_device[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_device_codec_refuses_nan_and_inf_naming_the_model(bad: float) -> None:
    swapped = np.zeros((2, 3, 4, 4), np.float16)
    mask = np.ones((2, 1, 4, 4), np.float16)
    mask[1, 0, 2, 2] = bad
    with pytest.raises(NonFiniteOutputs, match="NaN or infinite"):
        DeviceCropCodec(torch.device("cpu")).unpack(swapped, mask)


def test_crops_map_back_to_frames_by_opencvs_inverse() -> None:
    _, _, matrices = _scenes()
    expected = np.stack([cv2.invertAffineTransform(matrix.astype(np.float64)) for matrix in matrices])
    np.testing.assert_allclose(crop_to_frame(matrices), expected, rtol=1e-9, atol=1e-9)


def _as_nv12(frames: np.ndarray) -> np.ndarray:
    return np.stack([rgb_to_nv12(frame) for frame in frames])


def test_device_colour_conversions_are_opencvs() -> None:
    frames, _, _ = _scenes()
    nv12 = _as_nv12(frames)

    to_rgb = nv12_to_rgb_tensor(torch.from_numpy(nv12)).numpy()
    to_nv12 = rgb_to_nv12_tensor(torch.from_numpy(frames)).numpy()

    # The same fixed-point coefficients in float: at most a rounding step from OpenCV, and almost always none.
    for on_torch, by_cv2 in ((to_rgb, nv12_to_rgb(nv12)), (to_nv12, nv12)):
        assert on_torch.shape == by_cv2.shape
        difference = np.abs(on_torch.astype(int) - by_cv2.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_the_colour_tables_are_put_on_a_device_once() -> None:
    assert rgb_to_yuv_tables(torch.device("cpu")) is rgb_to_yuv_tables(torch.device("cpu"))


def _even_region_mask(nv12: np.ndarray, slots: list[int], matrices: np.ndarray) -> np.ndarray:
    """(n, H * 3 / 2, W) True on the luma and chroma bytes of each face's paste region grown to even corners."""
    height, width = nv12.shape[1] * 2 // 3, nv12.shape[2]
    inside = np.zeros(nv12.shape, bool)
    for slot, matrix in zip(slots, matrices, strict=True):
        box = paste_region(matrix, SIZE, height, width)
        if box is not None:
            x0, y0, x1, y1 = even_box(box)
            inside[slot, y0:y1, x0:x1] = True
            inside[slot, height + y0 // 2 : height + y1 // 2, x0:x1] = True
    return inside


def _assert_pasted_inside_the_regions_only(
    pasted: np.ndarray, expected: np.ndarray, nv12: np.ndarray, slots: list[int], matrices: np.ndarray
) -> None:
    """NV12 frames changed as `expected` inside the faces' even regions, and left as `nv12` outside them."""
    inside = _even_region_mask(nv12, slots, matrices)
    np.testing.assert_array_equal(pasted[inside], expected[inside])
    np.testing.assert_array_equal(pasted[~inside], nv12[~inside])
    assert not np.array_equal(pasted[inside], nv12[inside])


def test_the_torch_warper_pastes_into_nv12_frames_only_where_faces_are() -> None:
    frames, _, _ = _scenes()
    slots, matrices = _overlapping_faces()
    crops, masks = _swapped_crops(len(slots))
    nv12 = _as_nv12(frames)
    host = nv12.copy()
    rgb = nv12_to_rgb_tensor(torch.from_numpy(nv12))

    aligned = TorchFaceWarper("cpu").align(host, slots, matrices, SIZE)
    pasted = aligned.paste(crops, masks)

    assert pasted is host and isinstance(aligned, DeviceAlignedFaces)
    np.testing.assert_array_equal(aligned.crops.numpy(), align_batch(rgb, slots, matrices, SIZE).numpy())
    expected = rgb_to_nv12_tensor(
        paste_batch(rgb.clone(), slots, matrices, torch.from_numpy(crops), torch.from_numpy(masks))
    ).numpy()
    _assert_pasted_inside_the_regions_only(pasted, expected, nv12, slots, matrices)


def test_the_torch_warper_shrinks_nv12_frames_as_their_rgb() -> None:
    frames, _, _ = _scenes()
    nv12 = _as_nv12(frames)
    warper = TorchFaceWarper("cpu")
    expected = shrink_batch(nv12_to_rgb_tensor(torch.from_numpy(nv12)), (256, 150)).numpy()

    np.testing.assert_array_equal(warper.shrink(nv12, (256, 150)), expected)
    # At full size the detector still gets RGB.
    assert warper.shrink(nv12, (1024, 600)).shape == (5, 600, 1024, 3)
    assert (warper.pixel_format, HOST_WARPER.pixel_format) == ("nv12", "nv12")


class _NV12PanningClip:
    async def __aiter__(self) -> AsyncIterator[tuple[Frames, Sequence[int]]]:
        async for frames, indices in _PanningClip():
            yield _as_nv12(frames), indices


class _BothFacesInOrder:
    """_BothFaces for frames that cannot carry their index: batches come to detection in order."""

    def __init__(self) -> None:
        self._next = 0

    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        indices = range(self._next, self._next + len(frames))
        self._next += len(frames)
        return [
            [] if index == FACELESS_FRAME else [face_from_landmarks(points) for points in _pipeline_scene(index)[1]]
            for index in indices
        ]


@pytest.mark.parametrize("make_warper", [lambda: TorchFaceWarper("cpu"), Cv2FaceWarper], ids=["torch", "opencv"])
def test_the_chunk_pipeline_swaps_nv12_frames_as_it_swaps_their_rgb(make_warper: Callable[[], FaceWarper]) -> None:
    warper = make_warper()
    sink = _Collected()
    identity = SourceIdentity(crop=np.zeros((SIZE, SIZE, 3), np.uint8))
    swapper = CropTransferSwapper(_InvertingModel(), size=SIZE, crops=warper.crop_codec)
    pipeline = run_chunk_pipeline(
        _NV12PanningClip(), _BothFacesInOrder(), swapper, identity, sink, FaceSelection("many"), warper=warper
    )
    stats = asyncio.run(asyncio.wait_for(pipeline, timeout=30))
    _, rgb_frames = _run_pipeline(make_warper())

    assert (stats.frames, stats.faces) == (PIPELINE_FRAMES, 12)
    for index, (nv12, rgb) in enumerate(zip(sink.frames, rgb_frames, strict=True)):
        original = rgb_to_nv12(_pipeline_scene(index)[0])
        if index == FACELESS_FRAME:
            np.testing.assert_array_equal(nv12, original)
            continue
        assert nv12.shape == original.shape
        # Compared as NV12: the RGB run's frames keep the chroma detail that NV12 frames never had.
        assert psnr(nv12, rgb_to_nv12(rgb)) > 40.0, f"frame {index}"
        assert psnr(nv12, original) < 25.0, f"frame {index} was not swapped"


def test_the_host_warper_pastes_into_nv12_frames_only_where_faces_are() -> None:
    frames, _, _ = _scenes()
    slots, matrices = _overlapping_faces()
    crops, masks = _swapped_crops(len(slots))
    nv12 = _as_nv12(frames)
    host = nv12.copy()
    rgb = nv12_to_rgb(nv12)

    aligned = Cv2FaceWarper().align(host, slots, matrices, SIZE)
    pasted = aligned.paste(crops, masks)

    assert pasted is host and isinstance(aligned, HostAlignedFaces)
    np.testing.assert_array_equal(aligned.crops, Cv2FaceWarper().align(rgb, slots, matrices, SIZE).crops)
    expected = np.stack([rgb_to_nv12(frame) for frame in _pasted_by_cv2(rgb, slots, matrices, crops, masks)])
    _assert_pasted_inside_the_regions_only(pasted, expected, nv12, slots, matrices)


def test_the_host_warper_aligns_the_rgb_it_made_to_shrink_and_keeps_no_more_than_its_limit() -> None:
    frames, slots, matrices = _scenes()
    nv12 = _as_nv12(frames)
    warper = Cv2FaceWarper(kept_batches=2)
    small = warper.shrink(nv12, (256, 150))
    assert warper.kept_batches == 1
    np.testing.assert_array_equal(small, downscale_frames(nv12_to_rgb(nv12), (256, 150)))
    # At full size the detector still gets RGB.
    assert warper.shrink(nv12, (1024, 600)).shape == (5, 600, 1024, 3)

    fresh = Cv2FaceWarper().align(nv12.copy(), slots, matrices, SIZE)
    np.testing.assert_array_equal(warper.align(nv12, slots, matrices, SIZE).crops, fresh.crops)
    assert warper.kept_batches == 0
    batches = [nv12[:2].copy() for _ in range(4)]
    for batch in batches:
        warper.shrink(batch, (256, 150))
    assert warper.kept_batches == 2
    # A batch whose RGB was dropped is converted again when it is aligned.
    np.testing.assert_array_equal(warper.align(batches[0], slots[:2], matrices[:2], SIZE).crops, fresh.crops[:2])
    assert warper.kept_batches == 2

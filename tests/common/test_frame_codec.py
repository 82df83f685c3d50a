from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.frames.frame_codec import (
    Frames,
    frame_runs,
    outgoing_runs,
    pack_frames,
    received_frames,
    regroup_frames,
    unpack_frames,
    unpack_rgb_frames,
)
from services.common.frames.frame_memory import FrameMemory
from services.common.frames.frame_wire import FrameRun, SharedFrameRun, parse_frame_batch, serialize_frame_batch
from services.common.frames.pixel_formats import rgb_to_nv12
from swapline.common.v1 import common_pb2


def numbered_frames(count: int, height: int = 4, width: int = 6) -> Frames:
    return np.stack([np.full((height, width, 3), index, np.uint8) for index in range(count)])


def test_pack_and_unpack_round_trip() -> None:
    frames = numbered_frames(3)
    unpacked, indices, stamps = unpack_frames(pack_frames(frames, [7, 8, 9], [70, 80, 90]))
    assert np.array_equal(unpacked, frames) and indices == [7, 8, 9] and stamps == [70, 80, 90]


def test_a_frame_with_the_wrong_byte_count_is_rejected() -> None:
    batch = pack_frames(numbered_frames(1), [0])
    batch.frames[0].pixels = batch.frames[0].pixels[:-1]
    with pytest.raises(InvalidArgument, match="frame 0 has 71 bytes, expected 72"):
        unpack_frames(batch)


def nv12_frames(count: int, height: int = 4, width: int = 6) -> Frames:
    """Frames with distinct bytes throughout, luma and chroma, so a misplaced byte shows."""
    values = np.arange(count * height * 3 // 2 * width, dtype=np.uint64) * 7
    return values.astype(np.uint8).reshape(count, height * 3 // 2, width)


def test_nv12_frames_pack_as_an_nv12_batch_of_the_picture_size_and_unpack_unchanged() -> None:
    frames = nv12_frames(3)
    batch = pack_frames(frames, [7, 8, 9], [70, 80, 90])
    assert (batch.width, batch.height, batch.pixel_format) == (6, 4, common_pb2.PIXEL_FORMAT_NV12)
    assert [len(frame.pixels) for frame in batch.frames] == [36, 36, 36]
    unpacked, indices, stamps = unpack_frames(batch)
    assert unpacked.shape == (3, 6, 6)
    assert np.array_equal(unpacked, frames) and indices == [7, 8, 9] and stamps == [70, 80, 90]


def test_rgb_frames_pack_as_the_batches_receivers_knew_before_nv12() -> None:
    frames = numbered_frames(1)
    batch = pack_frames(frames, [3], [30])
    assert batch.pixel_format == common_pb2.PIXEL_FORMAT_RGB24
    before = common_pb2.FrameBatch(width=6, height=4)
    before.frames.add(index=3, pts=30, pixels=frames[0].tobytes())
    assert batch.SerializeToString() == before.SerializeToString()


def test_a_single_uncopied_nv12_frame_has_its_layout() -> None:
    frames, _, _ = unpack_frames(pack_frames(nv12_frames(1), [0]), copy=False)
    assert frames.shape == (1, 6, 6) and np.array_equal(frames, nv12_frames(1))


def test_an_nv12_frame_with_the_wrong_byte_count_is_rejected() -> None:
    batch = pack_frames(nv12_frames(2), [0, 1])
    batch.frames[1].pixels = batch.frames[1].pixels[:-1]
    with pytest.raises(InvalidArgument, match="frame 1 has 35 bytes, expected 36 for 6x4 nv12"):
        unpack_frames(batch)


def test_rgb_bytes_in_a_batch_marked_nv12_are_rejected() -> None:
    batch = pack_frames(numbered_frames(1), [0])
    batch.pixel_format = common_pb2.PIXEL_FORMAT_NV12
    with pytest.raises(InvalidArgument, match="frame 0 has 72 bytes, expected 36 for 6x4 nv12"):
        unpack_frames(batch)


def test_an_nv12_batch_of_odd_size_is_rejected() -> None:
    batch = pack_frames(nv12_frames(1), [0])
    batch.width = 5
    with pytest.raises(InvalidArgument, match="a 5x4 picture has no NV12 layout"):
        unpack_frames(batch)


def test_an_unknown_pixel_format_is_rejected() -> None:
    batch = pack_frames(numbered_frames(1), [0])
    batch.pixel_format = 7  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="unknown pixel format 7"):
        unpack_frames(batch)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((1, 4, 6, 4), np.uint8),
        np.zeros((1, 5, 6), np.uint8),
        np.zeros((1, 6, 5), np.uint8),
        np.zeros((6, 6), np.uint8),
        np.zeros((1, 4, 6, 3), np.float32),
        np.zeros((1, 6, 6), np.uint16),
    ],
    ids=["rgba", "rows not a multiple of 3", "odd width", "no count", "float rgb", "16-bit nv12"],
)
def test_arrays_of_other_shapes_or_dtypes_are_not_packed(frames: np.ndarray) -> None:
    with pytest.raises(InvalidArgument, match="frames must be"):
        pack_frames(frames, list(range(len(frames))))


def test_unpack_rgb_frames_converts_nv12_as_opencv_does() -> None:
    rng = np.random.default_rng(11)
    pictures = rng.integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    frames = np.stack([rgb_to_nv12(picture) for picture in pictures])
    rgb, indices, stamps = unpack_rgb_frames(pack_frames(frames, [4, 5], [40, 50]))
    assert rgb.shape == (2, 8, 12, 3) and (indices, stamps) == ([4, 5], [40, 50])
    for frame, converted in zip(frames, rgb, strict=True):
        assert np.array_equal(converted, cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_NV12))


def test_unpack_rgb_frames_leaves_rgb_as_it_is() -> None:
    frames = numbered_frames(2)
    rgb, _, _ = unpack_rgb_frames(pack_frames(frames, [0, 1]))
    assert np.array_equal(rgb, frames)


def test_nv12_stream_messages_are_sized_by_nv12_bytes() -> None:
    frames = nv12_frames(5)
    runs = list(frame_runs(frames, list(range(5)), message_bytes=2 * frames[0].nbytes))
    assert [len(run.frames) for run in runs] == [2, 2, 1]
    assert all(run.frames.shape[1:] == (6, 6) for run in runs)


def test_stream_messages_stay_under_the_size_and_keep_the_order() -> None:
    frames = numbered_frames(5)
    runs = list(frame_runs(frames, list(range(5)), message_bytes=2 * frames[0].nbytes))
    assert [len(run.frames) for run in runs] == [2, 2, 1]
    assert [index for run in runs for index in run.indices] == [0, 1, 2, 3, 4]


def test_a_frame_larger_than_the_message_size_still_travels_alone() -> None:
    runs = list(frame_runs(numbered_frames(2), [0, 1], message_bytes=10))
    assert [len(run.frames) for run in runs] == [1, 1]


def test_uncopied_single_frames_are_read_only_views() -> None:
    frames, _, _ = unpack_frames(pack_frames(numbered_frames(1), [0]), copy=False)
    assert not frames.flags.writeable
    copied, _, _ = unpack_frames(pack_frames(numbered_frames(1), [0]))
    assert copied.flags.writeable


async def _pieces(sizes: list[int]) -> AsyncIterator[tuple[Frames, list[int]]]:
    start = 0
    for size in sizes:
        frames = numbered_frames(start + size)[start:]
        frames.flags.writeable = False
        yield frames, list(range(start, start + size))
        start += size


async def _regrouped(sizes: list[int], batch_size: int) -> list[tuple[Frames, list[int]]]:
    return [batch async for batch in regroup_frames(_pieces(sizes), batch_size)]


@pytest.mark.parametrize("batch_size", [0, -1])
def test_regrouping_into_batches_of_no_frames_is_refused_before_reading(batch_size: int) -> None:
    with pytest.raises(InvalidArgument, match=f"at least one frame, got batch_size {batch_size}"):
        asyncio.run(asyncio.wait_for(_regrouped([1, 1], batch_size), timeout=10))


def test_regrouping_makes_full_writable_batches_in_order() -> None:
    batches = asyncio.run(_regrouped([1, 1, 3, 1, 1], batch_size=3))
    assert [indices for _, indices in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(frames.flags.writeable for frames, _ in batches)
    assert [int(frames[0, 0, 0, 0]) for frames, _ in batches] == [0, 3, 6]


def test_regrouping_splits_pieces_larger_than_a_batch() -> None:
    batches = asyncio.run(_regrouped([7], batch_size=3))
    assert [indices for _, indices in batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_frames_go_to_the_frame_memory_as_one_message_naming_their_file(tmp_path: Path) -> None:
    memory = FrameMemory(tmp_path, 1024 * 1024)
    frames = numbered_frames(3)
    runs, name = outgoing_runs(memory, frames, [4, 5, 6], [40, 50, 60], tag="call")
    assert name is not None and runs == [SharedFrameRun(name, "rgb24", 6, 4, [4, 5, 6], [40, 50, 60])]
    received, indices, stamps = received_frames(parse_frame_batch(serialize_frame_batch(runs[0])), memory)
    assert np.array_equal(received, frames) and indices == [4, 5, 6] and stamps == [40, 50, 60]


def test_without_room_in_the_frame_memory_frames_go_in_the_messages(tmp_path: Path) -> None:
    frames = numbered_frames(2)
    for memory in (FrameMemory(tmp_path, 0), None):
        runs, name = outgoing_runs(memory, frames, [0, 1])
        assert name is None and len(runs) == 1 and isinstance(runs[0], FrameRun)
        assert np.shares_memory(runs[0].frames, frames) and runs[0].indices == [0, 1]


def test_shared_frames_reaching_a_service_without_a_frame_memory_are_refused(tmp_path: Path) -> None:
    run = SharedFrameRun("x.frames", "rgb24", 6, 4, [0])
    with pytest.raises(InvalidArgument, match="has none"):
        received_frames(parse_frame_batch(serialize_frame_batch(run)), None)


def test_shared_frames_that_also_carry_pixels_are_refused(tmp_path: Path) -> None:
    batch = pack_frames(numbered_frames(1), [0])
    batch.shared.name = "x.frames"
    with pytest.raises(InvalidArgument, match="carry pixels too"):
        received_frames(parse_frame_batch(batch.SerializeToString()), FrameMemory(tmp_path, 0))


def test_messages_without_a_file_are_unpacked_as_before(tmp_path: Path) -> None:
    frames = numbered_frames(2)
    received, indices, _ = received_frames(parse_frame_batch(serialize_frame_batch(FrameRun(frames, [0, 1]))), None)
    assert np.array_equal(received, frames) and indices == [0, 1]


def test_regrouping_passes_a_writable_whole_batch_on_uncopied() -> None:
    whole = numbered_frames(3)

    async def pieces() -> AsyncIterator[tuple[Frames, list[int]]]:
        yield whole, [0, 1, 2]

    async def regrouped() -> list[tuple[Frames, list[int]]]:
        return [batch async for batch in regroup_frames(pieces(), 3)]

    ((batch, indices),) = asyncio.run(regrouped())
    assert batch is whole and indices == [0, 1, 2]


def test_shared_frames_of_no_size_are_refused(tmp_path: Path) -> None:
    batch = common_pb2.FrameBatch(frames=[common_pb2.Frame(index=0)], shared=common_pb2.SharedFrames(name="x.frames"))
    with pytest.raises(InvalidArgument, match="a batch of 0x0 pictures"):
        received_frames(parse_frame_batch(batch.SerializeToString()), FrameMemory(tmp_path, 0))

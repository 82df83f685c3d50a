from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.frame_codec import (
    Frames,
    frame_runs,
    pack_frames,
    regroup_frames,
    unpack_frames,
)


def numbered_frames(count: int, height: int = 4, width: int = 6) -> Frames:
    return np.stack([np.full((height, width, 3), index, np.uint8) for index in range(count)])


def test_pack_and_unpack_round_trip() -> None:
    frames = numbered_frames(3)
    unpacked, indices, stamps = unpack_frames(pack_frames(frames, [7, 8, 9], [70, 80, 90]))
    assert np.array_equal(unpacked, frames) and indices == [7, 8, 9] and stamps == [70, 80, 90]


def test_a_frame_with_the_wrong_byte_count_is_rejected() -> None:
    batch = pack_frames(numbered_frames(1), [0])
    batch.frames[0].rgb = batch.frames[0].rgb[:-1]
    with pytest.raises(InvalidArgument, match="frame 0 has 71 bytes, expected 72"):
        unpack_frames(batch)


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


def test_regrouping_makes_full_writable_batches_in_order() -> None:
    batches = asyncio.run(_regrouped([1, 1, 3, 1, 1], batch_size=3))
    assert [indices for _, indices in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(frames.flags.writeable for frames, _ in batches)
    assert [int(frames[0, 0, 0, 0]) for frames, _ in batches] == [0, 3, 6]


def test_regrouping_splits_pieces_larger_than_a_batch() -> None:
    batches = asyncio.run(_regrouped([7], batch_size=3))
    assert [indices for _, indices in batches] == [[0, 1, 2], [3, 4, 5], [6]]

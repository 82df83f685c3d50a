from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import cv2
import numpy as np
import pytest

from services.common.errors import Unavailable
from services.common.face_geometry import CropLayout
from services.common.face_types import DetectedFace
from services.common.frames.frame_codec import Frames
from services.worker.chunk_pipeline import STAGE_NAMES, ChunkStats, run_chunk_pipeline
from services.worker.face_aligner import alignment_matrix
from services.worker.face_selector import FaceSelection
from services.worker.face_swapper import SourceIdentity, SwappedFaces
from tests.worker.face_photos import astronaut, astronaut_landmarks, face_from_landmarks

FRAME_SIZE = 256
CROP = 96
BATCH = 3
# Frames where no face is reported, to exercise face-count changes.
FACELESS = frozenset({4, 5})


def _scene(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame `index`: the astronaut shrunk and panned, its index written into the top-left pixel."""
    scale = FRAME_SIZE / astronaut().shape[0]
    shift = np.array([index * 2.0, -index * 1.0], np.float32)
    matrix = np.array([[scale, 0, shift[0]], [0, scale, shift[1]]], np.float32)
    frame = cv2.warpAffine(astronaut(), matrix, (FRAME_SIZE, FRAME_SIZE), borderMode=cv2.BORDER_REFLECT)
    frame[0, 0] = index
    return frame, astronaut_landmarks() * scale + shift


class _PhotoSource:
    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.originals = [_scene(index)[0] for index in range(frames)]
        self.yielded_batches = 0
        self.second_batch_yielded = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[tuple[Frames, Sequence[int]]]:
        for start in range(0, self.frames, BATCH):
            indices = list(range(start, min(start + BATCH, self.frames)))
            self.yielded_batches += 1
            if self.yielded_batches == 2:
                self.second_batch_yielded.set()
            yield np.stack([self.originals[index].copy() for index in indices]), indices


class _KnownFaces:
    def __init__(self, fail_on_call: int | None = None, wait_for: asyncio.Event | None = None) -> None:
        self.calls = 0
        self._fail_on_call = fail_on_call
        self._wait_for = wait_for

    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        self.calls += 1
        if self._wait_for is not None and self.calls == 1:
            await self._wait_for.wait()
        if self.calls == self._fail_on_call:
            raise Unavailable("detector went away")
        found = []
        for frame in frames:
            index = int(frame[0, 0, 0])
            found.append([] if index in FACELESS else [face_from_landmarks(_scene(index)[1])])
        return found


class _InvertingSwapper:
    def __init__(self, block: bool = False, fallbacks_per_swap: int = 0) -> None:
        self.target_layout = self.source_layout = CropLayout(CROP)
        self.block = block
        self.fallbacks_per_swap = fallbacks_per_swap
        self.swaps = 0
        self.started = asyncio.Event()
        self.cancelled = False

    async def prepare_source(self, source_crop: np.ndarray) -> SourceIdentity:
        return SourceIdentity(crop=source_crop)

    async def swap(self, target_crops: np.ndarray, identity: SourceIdentity) -> SwappedFaces:
        self.started.set()
        self.swaps += 1
        if self.block:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return SwappedFaces(255 - target_crops, np.ones(target_crops.shape[:3], np.float32), self.fallbacks_per_swap)


class _CollectingSink:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.closed = False

    async def write(self, frames: Frames) -> None:
        self.frames.extend(frame.copy() for frame in frames)

    async def close(self) -> int:
        self.closed = True
        return len(self.frames)


def _identity() -> SourceIdentity:
    return SourceIdentity(crop=np.zeros((CROP, CROP, 3), np.uint8))


def _run(source: _PhotoSource, finder: _KnownFaces, swapper: _InvertingSwapper, sink: _CollectingSink) -> ChunkStats:
    pipeline = run_chunk_pipeline(source, finder, swapper, _identity(), sink, FaceSelection("one"))
    return asyncio.run(asyncio.wait_for(pipeline, timeout=20))


def test_every_frame_reaches_the_sink_in_order_with_faces_pasted() -> None:
    source = _PhotoSource(frames=10)
    sink = _CollectingSink()
    stats = _run(source, _KnownFaces(), _InvertingSwapper(), sink)

    assert sink.closed
    assert [int(frame[0, 0, 0]) for frame in sink.frames] == list(range(10))
    for index, (original, result) in enumerate(zip(source.originals, sink.frames, strict=True)):
        if index in FACELESS:
            np.testing.assert_array_equal(result, original)
            continue
        landmarks = _scene(index)[1]
        x1, y1, x2, y2 = (int(v) for v in face_from_landmarks(landmarks, margin=0.1).box)
        inside_result = result[y1:y2, x1:x2].astype(int)
        inside_original = original[y1:y2, x1:x2].astype(int)
        to_inverted = np.abs(inside_result - (255 - inside_original)).mean()
        to_original = np.abs(inside_result - inside_original).mean()
        assert to_inverted < to_original / 4
        # Outside the crop's footprint in the frame (grown by 2 pixels) nothing changes.
        footprint = np.zeros(original.shape[:2], np.uint8)
        inverse = cv2.invertAffineTransform(alignment_matrix(landmarks, CROP))
        corners = np.array([[0, 0], [CROP, 0], [CROP, CROP], [0, CROP]], np.float32) @ inverse[:, :2].T + inverse[:, 2]
        cv2.fillConvexPoly(footprint, np.round(corners).astype(np.int32), (1,))
        outside = cv2.dilate(footprint, np.ones((5, 5), np.uint8)) == 0
        assert outside.sum() > original.shape[0] * original.shape[1] / 4
        np.testing.assert_array_equal(result[outside], original[outside])

    assert stats.frames == 10
    assert stats.faces == 8 and stats.frames_with_faces == 8
    assert stats.face_count_changes == [(0, 1), (4, 0), (6, 1)]
    assert all(stats.stage_seconds[stage] > 0 for stage in STAGE_NAMES)
    assert stats.started_at <= stats.finished_at


def test_the_swappers_fp32_fallbacks_add_up_in_the_chunk_stats() -> None:
    swapper = _InvertingSwapper(fallbacks_per_swap=2)
    stats = _run(_PhotoSource(frames=10), _KnownFaces(), swapper, _CollectingSink())
    assert swapper.swaps > 0 and stats.fp32_fallbacks == 2 * swapper.swaps


def test_stages_overlap_decode_runs_ahead_of_detect() -> None:
    async def scenario() -> ChunkStats:
        source = _PhotoSource(frames=9)
        # Detection of the first batch waits until the source has yielded the second one: only
        # overlapped stages get there.
        finder = _KnownFaces(wait_for=source.second_batch_yielded)
        pipeline = run_chunk_pipeline(
            source, finder, _InvertingSwapper(), _identity(), _CollectingSink(), FaceSelection("one")
        )
        return await asyncio.wait_for(pipeline, timeout=20)

    assert asyncio.run(scenario()).frames == 9


class _FlagWatchingSink(_CollectingSink):
    """Records whether the chunk said "frames sent" at each write and at close."""

    def __init__(self, stats: ChunkStats) -> None:
        super().__init__()
        self.stats = stats
        self.flag_at_writes: list[bool] = []
        self.flag_at_close: bool | None = None

    async def write(self, frames: Frames) -> None:
        self.flag_at_writes.append(self.stats.frames_sent.is_set())
        await super().write(frames)

    async def close(self) -> int:
        self.flag_at_close = self.stats.frames_sent.is_set()
        return await super().close()


def test_frames_sent_is_set_after_the_last_write_and_before_the_segment_closes() -> None:
    async def scenario() -> _FlagWatchingSink:
        stats = ChunkStats()
        sink = _FlagWatchingSink(stats)
        pipeline = run_chunk_pipeline(
            _PhotoSource(frames=7), _KnownFaces(), _InvertingSwapper(), _identity(), sink, FaceSelection("one"), stats
        )
        await asyncio.wait_for(pipeline, timeout=20)
        return sink

    sink = asyncio.run(scenario())
    assert sink.flag_at_writes == [False, False, False]
    assert sink.flag_at_close is True


def test_a_detector_error_propagates_and_ends_the_pipeline() -> None:
    stats = ChunkStats()
    sink = _FlagWatchingSink(stats)
    pipeline = run_chunk_pipeline(
        _PhotoSource(frames=12),
        _KnownFaces(fail_on_call=2),
        _InvertingSwapper(),
        _identity(),
        sink,
        FaceSelection("one"),
        stats,
    )
    with pytest.raises(Unavailable, match="detector went away"):
        asyncio.run(asyncio.wait_for(pipeline, timeout=20))
    assert not sink.closed
    assert not stats.frames_sent.is_set()


def test_cancelling_the_pipeline_stops_every_stage() -> None:
    async def scenario() -> _InvertingSwapper:
        swapper = _InvertingSwapper(block=True)
        sink = _CollectingSink()
        task = asyncio.create_task(
            run_chunk_pipeline(_PhotoSource(frames=12), _KnownFaces(), swapper, _identity(), sink, FaceSelection("one"))
        )
        await asyncio.wait_for(swapper.started.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)
        assert not sink.closed
        return swapper

    assert asyncio.run(scenario()).cancelled


def test_face_count_changes_list_the_first_frame_and_each_change() -> None:
    stats = ChunkStats()
    for index, faces in [(30, 0), (31, 0), (32, 2), (33, 2), (34, 1), (35, 0)]:
        stats.record_frame(index, faces)
    assert stats.face_count_changes == [(30, 0), (32, 2), (34, 1), (35, 0)]
    assert (stats.frames, stats.faces, stats.frames_with_faces) == (6, 5, 3)


def test_busiest_stage_is_the_slowest_so_far() -> None:
    stats = ChunkStats()
    stats.stage_seconds.update(decode=0.5, detect=2.0, swap=1.0)
    assert stats.busiest_stage() == "detect"

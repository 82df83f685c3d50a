from __future__ import annotations

import itertools

import pytest

from services.common.media_info import Keyframe, MediaInfo
from services.gateway.chunk_planner import attempt_segment_uri, output_uri, plan_chunks, segment_uri
from services.gateway.job_records import PlannedChunk

PTS_PER_FRAME = 512


def video(frame_count: int, fps: float, keyframe_indices: list[int]) -> MediaInfo:
    return MediaInfo(
        kind="video",
        duration_seconds=frame_count / fps,
        fps=fps,
        frame_count=frame_count,
        width=64,
        height=48,
        has_audio=False,
        keyframes=tuple(Keyframe(index, index * PTS_PER_FRAME) for index in keyframe_indices),
    )


def assert_covers_contiguously(chunks: list[PlannedChunk], frame_count: int) -> None:
    assert chunks[0].start_frame == 0
    for before, after in itertools.pairwise(chunks):
        assert before.start_frame + before.frame_count == after.start_frame
    assert chunks[-1].start_frame + chunks[-1].frame_count == frame_count
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))


def test_regular_gops_group_into_chunks_of_at_least_chunk_seconds() -> None:
    info = video(250, 25.0, list(range(0, 250, 25)))
    chunks = plan_chunks("job1", info, chunk_seconds=2.0)
    assert_covers_contiguously(chunks, 250)
    assert [chunk.start_frame for chunk in chunks] == [0, 50, 100, 150, 200]
    assert all(chunk.frame_count == 50 for chunk in chunks)
    assert all(chunk.seek_pts == chunk.start_frame * PTS_PER_FRAME for chunk in chunks)


def test_irregular_keyframes_cut_at_the_first_keyframe_past_the_minimum() -> None:
    keyframes = [0, 10, 30, 45, 80, 90]
    info = video(100, 25.0, keyframes)
    chunks = plan_chunks("job1", info, chunk_seconds=1.0)
    assert_covers_contiguously(chunks, 100)
    # 0->10 is 0.4 s, 0->30 is 1.2 s: cut at 30; 30->45 is 0.6 s, 30->80 is 2 s: cut at 80; 80->end is short.
    assert [(chunk.start_frame, chunk.frame_count) for chunk in chunks] == [(0, 30), (30, 50), (80, 20)]
    for chunk in chunks:
        assert chunk.start_frame in keyframes
    for chunk in chunks[:-1]:
        assert chunk.frame_count >= 25


def test_one_keyframe_video_is_one_chunk() -> None:
    chunks = plan_chunks("job1", video(300, 30.0, [0]), chunk_seconds=2.0)
    assert [(chunk.start_frame, chunk.seek_pts, chunk.frame_count) for chunk in chunks] == [(0, 0, 300)]


def test_keyframes_beyond_the_stream_and_a_missing_first_keyframe_are_handled() -> None:
    info = video(60, 10.0, [30, 20, 200])
    chunks = plan_chunks("job1", info, chunk_seconds=2.0)
    assert_covers_contiguously(chunks, 60)
    assert [(chunk.start_frame, chunk.seek_pts) for chunk in chunks] == [(0, 0), (20, 20 * PTS_PER_FRAME)]


def test_image_is_one_chunk_of_one_frame_with_png_segment() -> None:
    image = MediaInfo("image", 0.0, 0.0, 1, 640, 480, False, (Keyframe(0, 0),))
    chunks = plan_chunks("abc", image, chunk_seconds=2.0)
    assert chunks == [PlannedChunk(0, 0, 0, 1, "work/abc/chunk-00000.png")]
    assert output_uri("abc", "image") == "outputs/abc/output.png"


@pytest.mark.parametrize(("index", "expected"), [(0, "work/j/chunk-00000.mp4"), (12, "work/j/chunk-00012.mp4")])
def test_segment_uris_are_numbered_in_order(index: int, expected: str) -> None:
    assert segment_uri("j", index, "video") == expected
    assert output_uri("j", "video") == "outputs/j/output.mp4"


def test_every_lease_of_a_chunk_writes_its_own_segment() -> None:
    assert attempt_segment_uri("work/j/chunk-00003.mp4", 1) == "work/j/chunk-00003-a1.mp4"
    assert attempt_segment_uri("work/j/chunk-00003.mp4", 2) == "work/j/chunk-00003-a2.mp4"
    assert attempt_segment_uri("work/j/chunk-00000.png", 7) == "work/j/chunk-00000-a7.png"

from __future__ import annotations

import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest

from services.cli import sample_media
from services.common.errors import InvalidArgument
from services.common.input_limits import InputLimits
from services.decoder.frame_reader import iter_frame_batches
from services.decoder.media_probe import probe_media


def sequential_frames(path: Path) -> tuple[np.ndarray, list[int]]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    pictures = np.stack([frame.to_ndarray(format="rgb24") for frame in frames])
    return pictures, [frame.pts or 0 for frame in frames]


Decoded = tuple[np.ndarray, list[int], list[int]]


def read_range(path: Path, start: int, seek_pts: int, count: int, batch: int) -> Decoded:
    batches = list(iter_frame_batches(path, start, seek_pts, count, batch))
    assert all(len(frames) <= batch for frames, _, _ in batches)
    return (
        np.concatenate([frames for frames, _, _ in batches]),
        [index for _, indices, _ in batches for index in indices],
        [stamp for _, _, stamps in batches for stamp in stamps],
    )


def test_chunk_from_later_keyframe_matches_sequential_decode(small_video: Path) -> None:
    info = probe_media(small_video)
    expected, expected_pts = sequential_frames(small_video)
    keyframe = info.keyframes[2]
    frames, indices, stamps = read_range(small_video, keyframe.frame_index, keyframe.pts, 15, batch=4)
    assert indices == list(range(keyframe.frame_index, keyframe.frame_index + 15))
    assert stamps == expected_pts[keyframe.frame_index : keyframe.frame_index + 15]
    assert np.array_equal(frames, expected[keyframe.frame_index : keyframe.frame_index + 15])


def test_chunks_cover_every_frame_exactly_once(small_video: Path) -> None:
    info = probe_media(small_video)
    expected, _ = sequential_frames(small_video)
    starts = [*info.keyframes]
    ends = [key.frame_index for key in starts[1:]] + [info.frame_count]
    decoded: list[np.ndarray] = []
    all_indices: list[int] = []
    for key, end in zip(starts, ends, strict=True):
        frames, indices, _ = read_range(small_video, key.frame_index, key.pts, end - key.frame_index, batch=3)
        decoded.append(frames)
        all_indices.extend(indices)
    assert all_indices == list(range(info.frame_count))
    assert np.array_equal(np.concatenate(decoded), expected)


def test_range_past_the_end_raises(small_video: Path) -> None:
    info = probe_media(small_video)
    last = info.keyframes[-1]
    expected = rf"small\.mp4' is truncated or corrupt at frame {info.frame_count}"
    with pytest.raises(InvalidArgument, match=expected):
        list(iter_frame_batches(small_video, last.frame_index, last.pts, info.frame_count, 8))


def test_file_truncated_at_the_end_raises(small_video: Path, tmp_path: Path) -> None:
    """The index sits at the front (faststart), so the file opens but its last frames are gone."""
    faststart = tmp_path / "faststart.mp4"
    with (
        av.open(str(small_video)) as source,
        av.open(str(faststart), "w", format="mp4", options={"movflags": "faststart"}) as target,
    ):
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = stream
                target.mux(packet)
    intact = probe_media(faststart)
    data = faststart.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InvalidArgument, match=r"truncated\.mp4' is truncated or corrupt at frame \d+"):
        list(iter_frame_batches(truncated, 0, 0, intact.frame_count, 8))


def test_seek_pts_that_is_no_frame_is_refused(small_video: Path) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    with pytest.raises(InvalidArgument, match=f"seek_pts {keyframe.pts + 1} is not the timestamp of a frame"):
        list(iter_frame_batches(small_video, keyframe.frame_index, keyframe.pts + 1, 5, 8))


def test_invalid_range_is_refused(small_video: Path) -> None:
    with pytest.raises(InvalidArgument, match="frame_count > 0"):
        list(iter_frame_batches(small_video, 0, 0, 0, 8))


def test_image_decodes_as_one_frame(tmp_path: Path) -> None:
    image = sample_media.make_two_person_image(tmp_path / "two.png", size=(320, 180))
    ((frames, indices, stamps),) = list(iter_frame_batches(tmp_path / "two.png", 0, 0, 1, 8))
    assert indices == [0] and stamps == [0]
    assert np.array_equal(frames[0], image)


def test_range_starting_between_keyframes_drops_the_frames_before_it(small_video: Path) -> None:
    expected, expected_pts = sequential_frames(small_video)
    keyframe = probe_media(small_video).keyframes[1]
    start = keyframe.frame_index + 3
    frames, indices, stamps = read_range(small_video, start, expected_pts[start], 5, batch=8)
    assert indices == list(range(start, start + 5))
    assert stamps == expected_pts[start : start + 5]
    assert np.array_equal(frames, expected[start : start + 5])


def test_oversized_frames_are_refused_before_the_batch_buffer_exists(oversized_video: Path) -> None:
    """Without the check, the two 6000x6000 frames would fill a 216 MB buffer (numpy's, so traced)."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match=r"oversized\.mp4' is 6000x6000 .* the limit is 35\.7 Mpx"):
            list(iter_frame_batches(oversized_video, 0, 0, 2, 8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


def test_batches_stay_within_max_batch_bytes(small_video: Path) -> None:
    frame_bytes = 320 * 240 * 3
    batches = list(iter_frame_batches(small_video, 0, 0, 10, 8, max_batch_bytes=3 * frame_bytes + 1))
    assert [len(frames) for frames, _, _ in batches] == [3, 3, 3, 1]


def test_a_frame_larger_than_max_batch_bytes_still_comes_alone(small_video: Path) -> None:
    batches = list(iter_frame_batches(small_video, 0, 0, 2, 8, max_batch_bytes=1))
    assert [len(frames) for frames, _, _ in batches] == [1, 1]


def test_images_are_held_to_the_image_limit(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(sample_media.encode_png(sample_media.astronaut_photo()))
    with pytest.raises(InvalidArgument, match=r"photo\.png' is 512x512"):
        list(iter_frame_batches(path, 0, 0, 1, 8, InputLimits(max_image_pixels=512 * 512 - 1)))

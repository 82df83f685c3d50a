from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from services.cli import sample_media
from services.common.errors import InvalidArgument
from services.common.frames.pixel_formats import PixelFormat
from services.common.input_limits import InputLimits
from services.common.media_probe import probe_media
from services.decoder.frame_reader import iter_frame_batches, served_format


def sequential_frames(path: Path, pixel_format: PixelFormat = "rgb24") -> tuple[np.ndarray, list[int]]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    pictures = np.stack([frame.to_ndarray(format=pixel_format) for frame in frames])
    return pictures, [frame.pts or 0 for frame in frames]


Decoded = tuple[np.ndarray, list[int], list[int]]


def read_range(
    path: Path, start: int, seek_pts: int, count: int, batch: int, pixel_format: PixelFormat = "rgb24"
) -> Decoded:
    batches = list(iter_frame_batches(path, start, seek_pts, count, batch, pixel_format=pixel_format))
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


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    error = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / error))


def make_odd_sized_video(path: Path, frame_count: int = 3) -> Path:
    """321x181 H.264 frames: 4:4:4 chroma, since 4:2:0 (and so NV12) needs even sides."""
    picture = sample_media.astronaut_photo()[:181, :321]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 321, 181, "yuv444p"
        for index in range(frame_count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(picture, index, axis=1)), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_nv12_batches_are_pyavs_nv12_frames_of_the_range(small_video: Path) -> None:
    info = probe_media(small_video)
    expected, expected_pts = sequential_frames(small_video, "nv12")
    keyframe = info.keyframes[2]
    start = keyframe.frame_index
    frames, indices, stamps = read_range(small_video, start, keyframe.pts, 15, batch=4, pixel_format="nv12")
    assert frames.shape == (15, 240 * 3 // 2, 320) and frames.dtype == np.uint8
    assert indices == list(range(start, start + 15))
    assert stamps == expected_pts[start : start + 15]
    assert np.array_equal(frames, expected[start : start + 15])


def test_nv12_frames_converted_by_opencv_are_close_to_pyavs_rgb(small_video: Path) -> None:
    """The decoder's NV12 and its RGB are the same pictures: swscale's rgb24 interpolates chroma where OpenCV
    repeats it, so they differ at colour edges only. Measured: 46.2 dB over the clip (at worst 45.6 for a
    frame); the same bytes read as BGR, as NV21 or as I420 give 15 to 18 dB, a frame off by one 23 dB."""
    rgb, _ = sequential_frames(small_video)
    frames, _, _ = read_range(small_video, 0, 0, len(rgb), batch=8, pixel_format="nv12")
    converted = np.stack([cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_NV12) for frame in frames])
    assert converted.shape == rgb.shape
    assert psnr(converted, rgb) > 40
    assert min(psnr(ours, theirs) for ours, theirs in zip(converted, rgb, strict=True)) > 40


def test_nv12_batches_are_sized_by_nv12_bytes(small_video: Path) -> None:
    """Three NV12 frames fit where only one RGB frame would (320x240: 115,200 bytes against 230,400)."""
    frame_bytes = 320 * 240 * 3 // 2
    batches = list(
        iter_frame_batches(small_video, 0, 0, 10, 8, max_batch_bytes=3 * frame_bytes + 1, pixel_format="nv12")
    )
    assert [len(frames) for frames, _, _ in batches] == [3, 3, 3, 1]


def test_a_request_without_a_format_is_served_rgb(small_video: Path) -> None:
    ((frames, _, _),) = list(iter_frame_batches(small_video, 0, 0, 2, 8))
    assert frames.shape == (2, 240, 320, 3)


@pytest.mark.parametrize(
    ("asked", "width", "height", "served"),
    [
        ("nv12", 320, 240, "nv12"),
        ("nv12", 321, 240, "rgb24"),
        ("nv12", 320, 241, "rgb24"),
        ("nv12", 1, 1, "rgb24"),
        ("rgb24", 320, 240, "rgb24"),
        ("rgb24", 321, 241, "rgb24"),
    ],
)
def test_served_format(asked: PixelFormat, width: int, height: int, served: PixelFormat) -> None:
    assert served_format(asked, width, height) == served


def test_nv12_is_served_only_for_limited_range_420_sources() -> None:
    assert served_format("nv12", 32, 32, "yuv420p", full_range=False) == "nv12"
    assert served_format("nv12", 32, 32, "yuv420p", full_range=True) == "rgb24"
    assert served_format("nv12", 32, 32, "yuvj420p", full_range=True) == "rgb24"
    assert served_format("nv12", 32, 32, "rgb24") == "rgb24"
    assert served_format("nv12", 32, 32, "yuv444p") == "rgb24"
    assert served_format("nv12", 32, 32, None) == "rgb24"


def test_an_odd_sized_video_asked_for_nv12_is_served_rgb(tmp_path: Path) -> None:
    path = make_odd_sized_video(tmp_path / "odd.mp4")
    expected, _ = sequential_frames(path)
    frames, indices, _ = read_range(path, 0, 0, 3, batch=8, pixel_format="nv12")
    assert frames.shape == (3, 181, 321, 3) and indices == [0, 1, 2]
    assert np.array_equal(frames, expected)


def test_an_odd_sized_image_asked_for_nv12_is_served_rgb(tmp_path: Path) -> None:
    image = sample_media.make_two_person_image(tmp_path / "odd.png", size=(321, 181))
    ((frames, _, _),) = list(iter_frame_batches(tmp_path / "odd.png", 0, 0, 1, 8, pixel_format="nv12"))
    assert frames.shape == (1, 181, 321, 3)
    assert np.array_equal(frames[0], image)


def half_white_picture() -> np.ndarray:
    """32x32 RGB: white above, black below, the split on a macroblock edge so that H.264 keeps it exact."""
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[:16] = 255
    return picture


def write_full_range_video(path: Path) -> Path:
    """Two lossless yuvj420p (full range: black 0, white 255) frames of half_white_picture, as JPEG-derived
    and many phone videos are."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast", "qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
        for index in range(2):
            frame = av.VideoFrame.from_ndarray(half_white_picture(), format="rgb24").reformat(format="yuvj420p")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_png(path: Path) -> Path:
    path.write_bytes(sample_media.encode_png(half_white_picture()))
    return path


@pytest.mark.parametrize("write", [write_png, write_full_range_video], ids=["png", "yuvj420p video"])
def test_a_source_nv12_cannot_hold_as_it_is_is_served_rgb_when_nv12_is_asked(
    tmp_path: Path, write: Callable[[Path], Path]
) -> None:
    """An RGB picture would lose half its colour resolution in NV12, and a full-range (yuvj420p) video its levels
    (common.proto's NV12 is BT.601 limited range): both come as RGB, exactly what an rgb24 request gets."""
    path = write(tmp_path / ("picture.png" if write is write_png else "full.mp4"))
    frames, _, _ = read_range(path, 0, 0, 1, batch=1, pixel_format="nv12")
    rgb, _, _ = read_range(path, 0, 0, 1, batch=1, pixel_format="rgb24")
    assert frames.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(frames, rgb)
    assert np.abs(frames[0].astype(np.int16) - half_white_picture()).max() <= 3

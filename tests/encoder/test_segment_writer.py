from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from services.common.errors import Cancelled, InvalidArgument
from services.common.frames.pixel_formats import rgb_to_nv12
from services.common.media_probe import probe_media
from services.encoder.segment_writer import SegmentWriter
from tests.encoder.conftest import FPS, SIZE, decoded_frames


def write_segment(
    path: Path, frames: np.ndarray, fps: float = FPS, crf: int = 18, size: tuple[int, int] | None = None
) -> int:
    """Writes frames 7 at a time; `size` (width, height) is needed for NV12 frames, whose shape is not it."""
    width, height = size or (frames.shape[2], frames.shape[1])
    with SegmentWriter(path, fps, width, height, crf=crf, preset="veryfast") as writer:
        for start in range(0, len(frames), 7):
            writer.write(frames[start : start + 7])
    return writer.close()


def test_segment_keeps_frames_fps_and_size(tmp_path: Path, original_frames: np.ndarray) -> None:
    path = tmp_path / "segment.mp4"
    assert write_segment(path, original_frames[:20]) == 20
    info = probe_media(path)
    assert (info.frame_count, info.fps, info.width, info.height) == (20, FPS, *SIZE)
    assert info.video_codec == "h264" and not info.has_audio
    assert info.duration_seconds == pytest.approx(20 / FPS)
    decoded = decoded_frames(path)
    error = np.abs(decoded.astype(np.int16) - original_frames[:20].astype(np.int16)).mean()
    assert error < 4.0


def test_fractional_frame_rate_is_kept(tmp_path: Path, original_frames: np.ndarray) -> None:
    path = tmp_path / "ntsc.mp4"
    write_segment(path, original_frames[:12], fps=30000 / 1001)
    assert probe_media(path).fps == pytest.approx(30000 / 1001, abs=1e-6)


def test_image_path_writes_one_image(tmp_path: Path, original_frames: np.ndarray) -> None:
    path = tmp_path / "still.png"
    assert write_segment(path, original_frames[:1]) == 1
    written = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(written, original_frames[0])
    with pytest.raises(InvalidArgument, match="exactly one frame"):
        write_segment(tmp_path / "two.png", original_frames[:2])


@pytest.mark.parametrize(
    ("crf", "preset", "message"),
    [(52, "veryfast", "crf 52"), (-1, "veryfast", "crf -1"), (20, "warp", "preset")],
)
def test_invalid_settings_are_refused(tmp_path: Path, crf: int, preset: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        SegmentWriter(tmp_path / "bad.mp4", FPS, *SIZE, crf=crf, preset=preset)
    assert files_in(tmp_path) == []


def test_odd_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="even width and height"):
        SegmentWriter(tmp_path / "odd.mp4", FPS, 321, 240, crf=20, preset="veryfast")


def test_wrong_frame_size_is_refused_and_nothing_is_left(tmp_path: Path, original_frames: np.ndarray) -> None:
    path = tmp_path / "wrong.mp4"
    with (
        pytest.raises(InvalidArgument, match="takes 160x120 frames"),
        SegmentWriter(path, FPS, 160, 120, crf=20, preset="veryfast") as writer,
    ):
        writer.write(original_frames[:2])
    assert not path.exists()


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_long_file_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"file name 'xxxxx.*\.\.\. \(304 characters\) is over the limit of 255"):
        SegmentWriter(tmp_path / ("x" * 300 + ".mp4"), FPS, *SIZE, crf=20, preset="veryfast")


@pytest.mark.parametrize(("name", "frames"), [("seg.mp4", 30), ("still.png", 1)])
def test_nothing_is_at_the_path_until_the_file_is_complete(
    tmp_path: Path, original_frames: np.ndarray, name: str, frames: int
) -> None:
    path = tmp_path / name
    # One thread: x264 then holds back a fixed number of frames, and 30 are sure to reach the file.
    writer = SegmentWriter(path, FPS, *SIZE, crf=20, preset="veryfast", threads=1)
    assert files_in(tmp_path) == []
    writer.write(original_frames[:frames])
    (temporary,) = files_in(tmp_path)
    assert temporary.startswith(f".{name}.") and temporary.endswith(".part")
    assert writer.close() == frames
    assert files_in(tmp_path) == [name]


def test_discard_waits_for_the_write_in_progress_and_deletes_the_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(3).integers(0, 256, (24, 360, 480, 3), dtype=np.uint8)
    writer = SegmentWriter(tmp_path / "seg.mp4", FPS, 480, 360, crf=20, preset="veryfast")
    failures: list[BaseException] = []

    def write() -> None:
        try:
            writer.write(noise)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    assert wait_until(lambda: writer.frames_written > 0)
    writer.discard()
    assert writer.frames_written == len(noise)
    thread.join(timeout=60)
    assert failures == []
    assert files_in(tmp_path) == []
    with pytest.raises(InvalidArgument, match="already closed"):
        writer.write(noise[:1])


def test_two_writers_of_one_path_never_share_a_file_and_the_last_close_wins(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    path = tmp_path / "seg.mp4"
    stale = SegmentWriter(path, FPS, *SIZE, crf=20, preset="veryfast", threads=1)
    newer = SegmentWriter(path, FPS, *SIZE, crf=20, preset="veryfast", threads=1)
    stale.write(original_frames[:30])
    newer.write(original_frames[:32])
    assert len(files_in(tmp_path)) == 2
    stale.write(original_frames[30:34])
    assert newer.close() == 32
    assert probe_media(path).frame_count == 32
    assert stale.close() == 34
    assert files_in(tmp_path) == ["seg.mp4"]
    assert probe_media(path).frame_count == 34


def test_closing_without_frames_fails_and_leaves_nothing(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path / "seg.mp4", FPS, *SIZE, crf=20, preset="veryfast")
    with pytest.raises(InvalidArgument, match="no frames were written"):
        writer.close()
    assert files_in(tmp_path) == []


def test_x264_runs_the_threads_asked_for_as_frame_threads(tmp_path: Path, original_frames: np.ndarray) -> None:
    path = tmp_path / "threads.mp4"
    with SegmentWriter(path, FPS, *SIZE, crf=20, preset="veryfast", threads=3) as writer:
        writer.write(original_frames[:5])
    # x264 writes its settings into the stream; slice threads would read sliced_threads=1.
    settings = re.search(rb"x264 - core .*? threads=(\d+) .*? sliced_threads=(\d) ", path.read_bytes(), re.DOTALL)
    assert settings is not None and settings.groups() == (b"3", b"0")


def test_frames_are_converted_to_yuv420p_before_the_encoder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    formats: list[str] = []
    encode = av.video.stream.VideoStream.encode

    def recording_encode(stream: av.video.stream.VideoStream, frame: av.VideoFrame | None = None) -> list[av.Packet]:
        if frame is not None:
            formats.append(frame.format.name)
        return encode(stream, frame)

    monkeypatch.setattr(av.video.stream.VideoStream, "encode", recording_encode)
    with SegmentWriter(tmp_path / "s.mp4", FPS, *SIZE, crf=20, preset="veryfast", threads=1) as writer:
        writer.write(np.zeros((2, SIZE[1], SIZE[0], 3), np.uint8))
    assert formats == ["yuv420p", "yuv420p"]


def test_a_close_cancelled_before_the_rename_leaves_nothing(tmp_path: Path, original_frames: np.ndarray) -> None:
    cancelled = threading.Event()
    cancelled.set()
    writer = SegmentWriter(tmp_path / "seg.mp4", FPS, *SIZE, crf=20, preset="veryfast", threads=1)
    writer.write(original_frames[:5])
    with pytest.raises(Cancelled, match=r"'seg\.mp4' was cancelled before it was complete"):
        writer.close(cancelled)
    assert files_in(tmp_path) == []


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    error = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / error))


def as_nv12(frames: np.ndarray) -> np.ndarray:
    return np.stack([rgb_to_nv12(frame) for frame in frames])


def test_a_segment_of_nv12_frames_holds_every_frame_as_the_rgb_path_does(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    """Both paths hand x264 the same 4:2:0 picture (OpenCV's BT.601), so their segments match in quality.
    Measured: 38.3 dB each at crf 18 (the decoded frames were identical); U and V swapped reads 13 dB."""
    originals = original_frames[:20]
    from_nv12, from_rgb = tmp_path / "nv12.mp4", tmp_path / "rgb.mp4"
    assert write_segment(from_nv12, as_nv12(originals), size=SIZE) == 20
    assert write_segment(from_rgb, originals) == 20
    info = probe_media(from_nv12)
    assert (info.frame_count, info.fps, info.width, info.height, info.video_codec) == (20, FPS, *SIZE, "h264")
    decoded = decoded_frames(from_nv12)
    assert decoded.shape == originals.shape
    nv12_quality, rgb_quality = psnr(decoded, originals), psnr(decoded_frames(from_rgb), originals)
    assert nv12_quality > 35
    assert abs(nv12_quality - rgb_quality) < 0.5


def test_nv12_frames_reach_x264_as_nv12(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pictures: list[tuple[str, np.ndarray]] = []
    encode = av.video.stream.VideoStream.encode

    def recording_encode(stream: av.video.stream.VideoStream, frame: av.VideoFrame | None = None) -> list[av.Packet]:
        if frame is not None:
            pictures.append((frame.format.name, frame.to_ndarray()))
        return encode(stream, frame)

    monkeypatch.setattr(av.video.stream.VideoStream, "encode", recording_encode)
    frames = np.random.default_rng(2).integers(0, 256, (2, SIZE[1] * 3 // 2, SIZE[0]), dtype=np.uint8)
    with SegmentWriter(tmp_path / "s.mp4", FPS, *SIZE, crf=20, preset="veryfast", threads=1) as writer:
        writer.write(frames)
    assert [name for name, _ in pictures] == ["nv12", "nv12"]
    assert all(np.array_equal(picture, frame) for (_, picture), frame in zip(pictures, frames, strict=True))


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        ("nv12", "rgb", "was started with nv12 frames, got rgb24"),
        ("rgb", "nv12", "was started with rgb24 frames, got nv12"),
    ],
)
def test_a_segment_keeps_the_layout_it_started_with(
    tmp_path: Path, original_frames: np.ndarray, first: str, then: str, message: str
) -> None:
    layouts = {"rgb": original_frames[:4], "nv12": as_nv12(original_frames[:4])}
    writer = SegmentWriter(tmp_path / "mixed.mp4", FPS, *SIZE, crf=20, preset="veryfast")
    writer.write(layouts[first][:2])
    with pytest.raises(InvalidArgument, match=rf"'mixed\.mp4' {message}"):
        writer.write(layouts[then][2:])
    assert writer.frames_written == 2
    writer.discard()
    assert files_in(tmp_path) == []


def test_nv12_frames_of_the_wrong_size_are_refused(tmp_path: Path, original_frames: np.ndarray) -> None:
    with (
        pytest.raises(InvalidArgument, match="takes 160x120 frames, got 320x240"),
        SegmentWriter(tmp_path / "small.mp4", FPS, 160, 120, crf=20, preset="veryfast") as writer,
    ):
        writer.write(as_nv12(original_frames[:1]))
    assert files_in(tmp_path) == []


def test_an_image_written_from_an_nv12_frame_holds_its_rgb_picture(tmp_path: Path, original_frames: np.ndarray) -> None:
    path = tmp_path / "still.png"
    frame = rgb_to_nv12(original_frames[0])
    assert write_segment(path, frame[None], size=SIZE) == 1
    written = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert written.shape == (SIZE[1], SIZE[0], 3)
    assert np.array_equal(written, cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_NV12))
    # Measured 51.8 dB: the picture, not its luma or its bytes read as RGB.
    assert psnr(written, original_frames[0]) > 40


class _UnclosableTrack:
    """An encoder whose muxer refuses to close, as FFmpeg can."""

    def add(self, frame: np.ndarray, index: int) -> None: ...

    def finish(self) -> None: ...

    def abandon(self) -> None:
        raise RuntimeError("the muxer refuses to close")


def test_a_discarded_segment_leaves_no_partial_file_even_when_its_encoder_fails_to_close(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    writer = SegmentWriter(tmp_path / "seg.mp4", FPS, *SIZE, crf=20, preset="veryfast", threads=1)
    writer.write(original_frames[:30])
    assert len(files_in(tmp_path)) == 1
    real, writer._track = writer._track, _UnclosableTrack()
    with pytest.raises(RuntimeError, match="refuses to close"):
        writer.discard()
    assert files_in(tmp_path) == []
    assert real is not None
    real.abandon()

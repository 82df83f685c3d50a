from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument
from services.common.media_probe import probe_media
from services.encoder.segment_joiner import join_segments
from services.encoder.segment_writer import SegmentWriter
from tests.encoder.conftest import FPS, REPO_ROOT, decoded_frames


def segment(path: Path, frames: np.ndarray, crf: int = 20) -> Path:
    with SegmentWriter(path, FPS, frames.shape[2], frames.shape[1], crf=crf, preset="veryfast") as writer:
        writer.write(frames)
    return path


def audio_summary(path: Path) -> tuple[str, float]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [packet for packet in container.demux(stream) if packet.size]
        assert stream.time_base is not None
        seconds = float(sum(packet.duration or 0 for packet in packets) * stream.time_base)
        return stream.codec_context.name, seconds


def test_join_keeps_frames_fps_size_and_audio(
    tmp_path: Path, original_video: Path, original_frames: np.ndarray
) -> None:
    original = probe_media(original_video)
    split = original.keyframes[2].frame_index
    first = segment(tmp_path / "a.mp4", original_frames[:split])
    second = segment(tmp_path / "b.mp4", original_frames[split:])
    output = tmp_path / "joined.mp4"

    result = join_segments([first, second], output, original_video)

    joined = probe_media(output)
    assert result.frames == joined.frame_count == original.frame_count
    assert (joined.fps, joined.width, joined.height) == (original.fps, original.width, original.height)
    assert joined.duration_seconds == pytest.approx(original.duration_seconds, abs=1 / FPS)
    assert result.audio_copied and joined.has_audio
    codec, seconds = audio_summary(output)
    original_codec, original_seconds = audio_summary(original_video)
    assert codec == original_codec == "aac"
    assert seconds == pytest.approx(original_seconds, abs=0.05)
    expected = np.concatenate([decoded_frames(first), decoded_frames(second)])
    assert np.array_equal(decoded_frames(output), expected)


def test_join_without_audio_source(tmp_path: Path, original_frames: np.ndarray) -> None:
    parts = [segment(tmp_path / f"{n}.mp4", original_frames[n * 10 : (n + 1) * 10]) for n in range(3)]
    result = join_segments(parts, tmp_path / "joined.mp4", None)
    info = probe_media(tmp_path / "joined.mp4")
    assert result.frames == info.frame_count == 30
    assert not result.audio_copied and not info.has_audio
    assert [key.frame_index for key in info.keyframes] == [0, 10, 20]


def test_single_image_segment_is_copied(tmp_path: Path, original_frames: np.ndarray) -> None:
    still = tmp_path / "still.png"
    with SegmentWriter(still, 0.0, 320, 240, crf=20, preset="veryfast") as writer:
        writer.write(original_frames[:1])
    result = join_segments([still], tmp_path / "output.png", None)
    assert result.frames == 1
    assert (tmp_path / "output.png").read_bytes() == still.read_bytes()


def test_segments_encoded_differently_are_refused(tmp_path: Path, original_frames: np.ndarray) -> None:
    first = segment(tmp_path / "a.mp4", original_frames[:10])
    small = segment(tmp_path / "b.mp4", np.ascontiguousarray(original_frames[10:20, :120, :160]))
    with pytest.raises(
        InvalidArgument, match=r"'b\.mp4' was encoded differently from 'a\.mp4' \(h264 160x120 vs h264 320x240\)"
    ):
        join_segments([first, small], tmp_path / "joined.mp4", None)
    assert not (tmp_path / "joined.mp4").exists()


def test_no_segments_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="at least one segment"):
        join_segments([], tmp_path / "joined.mp4", None)


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_wrong_frame_count_fails_and_keeps_no_output(tmp_path: Path, original_frames: np.ndarray) -> None:
    parts = [segment(tmp_path / f"{n}.mp4", original_frames[n * 10 : (n + 1) * 10]) for n in range(2)]
    with pytest.raises(FailedPrecondition, match="holds 20 frames, expected 21"):
        join_segments(parts, tmp_path / "joined.mp4", None, expected_frames=21)
    assert files_in(tmp_path) == ["0.mp4", "1.mp4"]
    assert join_segments(parts, tmp_path / "joined.mp4", None, expected_frames=20).frames == 20
    assert probe_media(tmp_path / "joined.mp4").frame_count == 20


def test_a_cancelled_join_keeps_no_output(tmp_path: Path, original_frames: np.ndarray) -> None:
    parts = [segment(tmp_path / f"{n}.mp4", original_frames[n * 10 : (n + 1) * 10]) for n in range(2)]
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):
        join_segments(parts, tmp_path / "joined.mp4", None, cancelled=cancelled)
    assert files_in(tmp_path) == ["0.mp4", "1.mp4"]


def test_a_failed_join_leaves_the_previous_output_as_it_was(tmp_path: Path, original_frames: np.ndarray) -> None:
    first = segment(tmp_path / "a.mp4", original_frames[:10])
    small = segment(tmp_path / "b.mp4", np.ascontiguousarray(original_frames[10:20, :120, :160]))
    output = tmp_path / "joined.mp4"
    join_segments([first], output, None)
    before = output.read_bytes()
    with pytest.raises(InvalidArgument, match="encoded differently"):
        join_segments([first, small], output, None)
    assert output.read_bytes() == before
    assert files_in(tmp_path) == ["a.mp4", "b.mp4", "joined.mp4"]


# Runs a join in its own process and SIGKILLs that process at the tenth packet it muxes.
KILLED_JOIN = """
import heapq, os, signal, sys
from pathlib import Path
from services.encoder.segment_joiner import join_segments

merge = heapq.merge

def merge_then_die(*sources, key):
    for count, item in enumerate(merge(*sources, key=key)):
        if count == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        yield item

heapq.merge = merge_then_die
*segments, output = sys.argv[1:]
join_segments([Path(name) for name in segments], Path(output), None)
"""


def test_a_join_killed_half_way_leaves_no_file_at_the_output_path(tmp_path: Path, original_frames: np.ndarray) -> None:
    parts = [segment(tmp_path / f"{n}.mp4", original_frames[n * 10 : (n + 1) * 10]) for n in range(3)]
    output = tmp_path / "joined.mp4"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_JOIN, *map(str, parts), str(output)], cwd=REPO_ROOT, timeout=120
    )
    assert killed.returncode == -9
    assert not output.exists()

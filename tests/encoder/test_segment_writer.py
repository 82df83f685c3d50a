from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.decoder.media_probe import probe_media
from services.encoder.segment_writer import SegmentWriter
from tests.encoder.conftest import FPS, SIZE, decoded_frames


def write_segment(path: Path, frames: np.ndarray, fps: float = FPS, crf: int = 18) -> int:
    height, width = frames.shape[1:3]
    with SegmentWriter(path, fps, width, height, crf=crf, preset="veryfast") as writer:
        for start in range(0, len(frames), 7):
            writer.write(frames[start:start + 7])
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


def test_odd_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="even width and height"):
        SegmentWriter(tmp_path / "odd.mp4", FPS, 321, 240, crf=20, preset="veryfast")


def test_wrong_frame_size_is_refused_and_nothing_is_left(tmp_path: Path, original_frames: np.ndarray) -> None:
    path = tmp_path / "wrong.mp4"
    with pytest.raises(InvalidArgument, match=r"takes \(120, 160, 3\)"), SegmentWriter(
        path, FPS, 160, 120, crf=20, preset="veryfast"
    ) as writer:
        writer.write(original_frames[:2])
    assert not path.exists()

"""An output counts as complete only when it holds what a finished job makes of its target."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from services.cli import sample_media
from services.cli.batch_outputs import check_output, probe_target, remove_partial_files, skip_reason
from services.common.media_info import MediaInfo

SIZE = (160, 96)


def clip(path: Path, seconds: float, fps: int = 10) -> Path:
    return sample_media.make_face_video(path, sample_media.astronaut_photo(), seconds, SIZE, fps, audio=False)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("media")
    clip(directory / "target.mp4", 1.0)
    # The same pictures again: what a job's output looks like, frame for frame.
    clip(directory / "whole.mp4", 1.0)
    clip(directory / "short.mp4", 0.6)
    # As many frames as the target, at twice the rate: half as long.
    clip(directory / "fast.mp4", 0.5, fps=20)
    sample_media.make_truncated_mp4(directory / "whole.mp4", directory / "truncated.mp4")
    return directory


@pytest.fixture(scope="module")
def target(media: Path) -> MediaInfo:
    info = probe_target(media / "target.mp4")
    assert isinstance(info, MediaInfo) and info.frame_count == 10
    return info


def test_an_output_with_the_targets_frames_and_duration_is_complete(media: Path, target: MediaInfo) -> None:
    check = check_output(media / "whole.mp4", target)
    assert check.complete and check.frames == 10
    assert skip_reason(check) == "output exists and is complete: 10 frames, 1.00 s"


def test_a_truncated_output_is_not_complete(media: Path, target: MediaInfo) -> None:
    check = check_output(media / "truncated.mp4", target)
    assert not check.complete and "truncated or corrupt" in check.detail


def test_an_output_with_fewer_frames_is_not_complete(media: Path, target: MediaInfo) -> None:
    check = check_output(media / "short.mp4", target)
    assert not check.complete and check.detail == "it has 6 frames; the target has 10"


def test_an_output_with_the_frames_but_not_the_duration_is_not_complete(media: Path, target: MediaInfo) -> None:
    check = check_output(media / "fast.mp4", target)
    assert not check.complete and check.detail.startswith("it lasts 0.500 s")


def test_a_missing_or_empty_output_is_not_complete(tmp_path: Path, target: MediaInfo) -> None:
    assert check_output(tmp_path / "none.mp4", target).detail == "missing"
    (tmp_path / "empty.mp4").touch()
    assert check_output(tmp_path / "empty.mp4", target).detail == "empty"


def test_nothing_is_complete_against_a_target_that_cannot_be_read(media: Path, tmp_path: Path) -> None:
    unreadable = probe_target(sample_media.make_not_media_file(tmp_path / "notes.mp4"))
    assert isinstance(unreadable, str)
    check = check_output(media / "whole.mp4", unreadable)
    assert not check.complete and check.detail.startswith("the target cannot be read here")


def write_image(path: Path, width: int, height: int) -> Path:
    # Coarse noise: a real picture's worth of scan data, so that a cut falls inside it, not in the headers.
    noise = np.random.default_rng(7).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(path.suffix, cv2.resize(noise, (width, height)))
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_an_image_output_must_decode_whole_at_the_targets_size(tmp_path: Path, suffix: str) -> None:
    target = probe_target(write_image(tmp_path / f"target{suffix}", 64, 48))
    assert isinstance(target, MediaInfo) and target.kind == "image"
    whole = write_image(tmp_path / f"whole{suffix}", 64, 48)
    assert check_output(whole, target).complete
    assert check_output(write_image(tmp_path / f"small{suffix}", 32, 48), target).detail == (
        "the image is 32x48; the target is 64x48"
    )
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert check_output(cut, target).detail == "the image is truncated or corrupt"


def test_a_killed_runs_hidden_partial_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in (".a__x.mp4.0123456789abcdef.part", ".a__x.mp4.0123456789abcdef.part.part", "a__x.mp4", "b.part"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".swapline-stack").mkdir()
    removed = remove_partial_files(tmp_path)
    assert sorted(path.name for path in removed) == [
        ".a__x.mp4.0123456789abcdef.part",
        ".a__x.mp4.0123456789abcdef.part.part",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".swapline-stack", "a__x.mp4", "b.part"]

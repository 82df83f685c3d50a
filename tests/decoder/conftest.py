from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import sample_media

SMALL_SIZE = (320, 240)
SMALL_FPS = 25
SMALL_SECONDS = 2.0
SMALL_KEYFRAME_SECONDS = 0.4


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decoder-media")


@pytest.fixture(scope="session")
def small_video(media_root: Path) -> Path:
    """2 s of 320x240 at 25 fps, a keyframe every 10 frames, with audio."""
    return sample_media.make_face_video(
        media_root / "small.mp4", sample_media.astronaut_photo(), seconds=SMALL_SECONDS, size=SMALL_SIZE,
        fps=SMALL_FPS, keyframe_seconds=SMALL_KEYFRAME_SECONDS,
    )

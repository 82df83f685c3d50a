from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from services.cli import sample_media

SIZE = (320, 240)
FPS = 25


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-media")


@pytest.fixture(scope="session")
def original_video(media_root: Path) -> Path:
    """The media a job started from: 1.6 s, 320x240, 25 fps, keyframe every 0.4 s, with audio."""
    return sample_media.make_face_video(
        media_root / "original.mp4", sample_media.astronaut_photo(), seconds=1.6, size=SIZE, fps=FPS,
        keyframe_seconds=0.4,
    )


@pytest.fixture(scope="session")
def original_frames(original_video: Path) -> np.ndarray:
    with av.open(str(original_video)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])

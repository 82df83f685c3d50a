from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from services.cli import sample_media
from services.decoder.nvdec_reader import DECODERS, forget_files

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
        media_root / "small.mp4",
        sample_media.astronaut_photo(),
        seconds=SMALL_SECONDS,
        size=SMALL_SIZE,
        fps=SMALL_FPS,
        keyframe_seconds=SMALL_KEYFRAME_SECONDS,
    )


# 36 Mpx a frame: just past the default video limit (35.65 Mpx), and cheap to encode as black.
OVERSIZED_SIZE = (6000, 6000)


@pytest.fixture(scope="session")
def oversized_video(media_root: Path) -> Path:
    """Two black 6000x6000 H.264 frames: about 100 KB on disk, 216 MB once decoded to RGB."""
    path = media_root / "oversized.mp4"
    width, height = OVERSIZED_SIZE
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((height * 3 // 2, width), np.uint8), format="yuv420p")
        for index in range(2):
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(autouse=True)
def fresh_nvdec_state() -> Iterator[None]:
    """Each test's NVDEC stand-in measures its own timestamp shift and opens its own decoders: the reader keeps
    shifts per file and finished decoders in a pool."""
    forget_files()
    DECODERS.clear()
    yield
    forget_files()
    DECODERS.clear()

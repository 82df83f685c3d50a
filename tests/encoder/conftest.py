from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import grpc
import numpy as np
import pytest

from services.cli import sample_media

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZE = (320, 240)
FPS = 25


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-media")


@pytest.fixture(scope="session")
def original_video(media_root: Path) -> Path:
    """The media a job started from: 1.6 s, 320x240, 25 fps, keyframe every 0.4 s, with audio."""
    return sample_media.make_face_video(
        media_root / "original.mp4",
        sample_media.astronaut_photo(),
        seconds=1.6,
        size=SIZE,
        fps=FPS,
        keyframe_seconds=0.4,
    )


@pytest.fixture(scope="session")
def original_frames(original_video: Path) -> np.ndarray:
    with av.open(str(original_video)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@contextmanager
def encoder_process(media_root: Path, log_path: Path) -> Iterator[tuple[subprocess.Popen[str], grpc.Channel]]:
    """`python -m services.encoder` in its own process, so that a crash shows as its exit, not pytest's."""
    env = {
        **os.environ,
        "SWAPLINE_ENCODER_MEDIA_ROOT": str(media_root),
        "SWAPLINE_ENCODER_PORT": "0",
        "SWAPLINE_ENCODER_METRICS_PORT": "-1",
        "SWAPLINE_ENCODER_TRANSPORT_SECURITY": "plaintext",
        "SWAPLINE_ENCODER_AUTH_MODE": "open",
        # A crash prints the Python stack of every thread to the log.
        "PYTHONFAULTHANDLER": "1",
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.encoder"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"encoder listening on [\d.]+:(\d+)", line)
        assert match, f"the encoder did not start: {line!r}\n{log_path.read_text()[-2000:]}"
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            yield process, channel
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

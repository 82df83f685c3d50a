"""One real stack per test session: tritonserver plus every service as its own process on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import sample_media
from services.cli.embedded_stack import EmbeddedStack, StackOptions
from services.cli.job_client import JobClient


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    work_dir = tmp_path_factory.mktemp("stack")
    options = StackOptions(work_dir=work_dir, media_root=work_dir / "media", workers=2)
    with EmbeddedStack(options) as running:
        yield running


@pytest.fixture(scope="session")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """The stack as `swapline up --secure` runs it: TLS everywhere, tokens for tenants alice and bob.

    Started only by the tests that ask for it; `secure_stack.job_client("bob")` is a client for bob.
    """
    work_dir = tmp_path_factory.mktemp("secure-stack")
    options = StackOptions(work_dir=work_dir, media_root=work_dir / "media", workers=2, secure=True)
    with EmbeddedStack(options) as running:
        yield running


@pytest.fixture(scope="session")
def client(stack: EmbeddedStack) -> Iterator[JobClient]:
    with stack.job_client() as job_client:
        yield job_client


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inputs")


@pytest.fixture(scope="session")
def astronaut_video(media: Path) -> Path:
    """The acceptance video: 5 s, 720p, 25 fps, one real photo, camera motion, lighting change, audio."""
    return sample_media.make_face_video(media / "astronaut-720p.mp4", sample_media.astronaut_photo())


@pytest.fixture(scope="session")
def hopper_png() -> bytes:
    return sample_media.encode_png(sample_media.grace_hopper_photo())


@pytest.fixture(scope="session")
def astronaut_png() -> bytes:
    return sample_media.encode_png(sample_media.astronaut_photo())

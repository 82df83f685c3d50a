"""The whole embedded stack once, in --secure mode: tokens are required, and a killed gateway is restarted
on the same address while `swapline watch` follows a job through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli import sample_media
from services.cli.embedded_stack import REPOSITORY_ROOT, EmbeddedStack, ServiceRestart, StackOptions
from services.cli.job_client import JobClient
from services.cli.stack_credentials import StackCredentials
from services.common.errors import NotFound, Unauthenticated, Unavailable
from swapline.jobs.v1 import jobs_pb2

RESTART_TIMEOUT = 120.0
JOB_TIMEOUT = 600.0


@dataclass
class SupervisedStack:
    stack: EmbeddedStack
    restarts: list[ServiceRestart]

    @property
    def credentials(self) -> StackCredentials:
        assert self.stack.credentials is not None
        return self.stack.credentials


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisedStack]:
    work_dir = tmp_path_factory.mktemp("secure-stack")
    restarts: list[ServiceRestart] = []
    options = StackOptions(
        work_dir=work_dir, media_root=work_dir / "media", workers=1, secure=True, tenants=("alice", "bob")
    )
    with EmbeddedStack(options, on_restart=restarts.append) as stack:
        yield SupervisedStack(stack, restarts)


def test_a_call_without_a_valid_token_is_refused(secure: SupervisedStack) -> None:
    address, ca_file = secure.stack.gateway_address, secure.credentials.ca_file
    with JobClient(address, ca_file=ca_file) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list()
    with JobClient(address, token="not-a-token", ca_file=ca_file) as forger, pytest.raises(Unauthenticated):
        forger.list()
    # Without TLS there is no connection at all.
    with JobClient(address, token=secure.credentials.token("alice")) as plaintext, pytest.raises(Unavailable):
        plaintext.list()
    with secure.stack.job_client("alice") as alice:
        assert isinstance(alice.list(), list)


def swapline(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, **env},
        cwd=REPOSITORY_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_follows_a_job_through_a_gateway_restart(secure: SupervisedStack, tmp_path: Path) -> None:
    stack = secure.stack
    video = sample_media.make_face_video(
        tmp_path / "target.mp4", sample_media.astronaut_photo(), seconds=3.0, size=(640, 360)
    )
    source = sample_media.encode_png(sample_media.grace_hopper_photo())
    with stack.job_client("alice") as alice:
        job = alice.submit(source, target_path=video)
    watch = swapline(stack.client_env("alice"), "watch", job.id)
    try:
        assert watch.stderr is not None
        first_line = watch.stderr.readline()
        # The watch is connected and the job is not over: the kill lands on an open stream.
        assert "frames" in first_line, first_line
        assert "succeeded" not in first_line and "failed" not in first_line
        killed = stack.pid("gateway")
        os.kill(killed, signal.SIGKILL)
        stack.wait_restarted("gateway", killed, RESTART_TIMEOUT)
        _, rest_of_output = watch.communicate(timeout=JOB_TIMEOUT)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    output = first_line + rest_of_output
    assert watch.returncode == 0, output
    assert "reconnecting" in output
    assert "100.0%" in output and "succeeded" in output
    with stack.job_client("alice") as alice:
        finished = alice.get(job.id)
    assert finished.state == jobs_pb2.JOB_STATE_SUCCEEDED, finished.error.message
    assert finished.frames_done == finished.frames_total == 75
    assert stack.restarts()["gateway"] == 1
    assert [restart.describe() for restart in secure.restarts] == [
        f"restarted gateway (exit {-signal.SIGKILL}), restart 1"
    ]
    # The restarted gateway still knows whose job it is.
    with stack.job_client("bob") as bob, pytest.raises(NotFound):
        bob.get(job.id)

"""Bad input: the right status, a message naming the problem, a FAILED job, a non-zero CLI; others go on."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from services.cli import sample_media
from services.cli.__main__ import main as cli_main
from services.cli.embedded_stack import EmbeddedStack
from services.cli.job_client import JobClient
from services.common.errors import SwaplineError
from swapline.jobs.v1 import jobs_pb2
from tests.e2e.job_helpers import wait_for_end


@pytest.fixture(scope="module")
def bad_inputs(media: Path, astronaut_video: Path) -> dict[str, Path]:
    not_media = media / "notes.txt"
    sample_media.make_not_media_file(not_media)
    truncated = media / "truncated.mp4"
    sample_media.make_truncated_mp4(astronaut_video, truncated)
    empty = media / "empty.mp4"
    empty.write_bytes(b"")
    faceless = media / "faceless.png"
    faceless.write_bytes(sample_media.encode_png(np.full((480, 640, 3), 128, np.uint8)))
    return {"not_media": not_media, "truncated": truncated, "empty": empty, "faceless": faceless}


CASES = {
    # name: (target as upload or uri, source, expected code, words the message must contain)
    "missing file": ("uri:no/such/video.mp4", "hopper", grpc.StatusCode.NOT_FOUND, "does not exist"),
    "not a video": ("upload:not_media", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "not a video or image"),
    "truncated mp4": ("upload:truncated", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "faceless source": ("upload:video", "faceless", grpc.StatusCode.FAILED_PRECONDITION, "no face"),
    "zero-byte upload": ("upload:empty", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "outside media root": ("uri:../../etc/passwd", "hopper", grpc.StatusCode.PERMISSION_DENIED, "outside"),
}


def _inputs(case: str, bad_inputs: dict[str, Path], astronaut_video: Path, hopper_png: bytes) -> tuple:
    target, source_name, _, _ = CASES[case]
    kind, name = target.split(":", 1)
    source = bad_inputs["faceless"].read_bytes() if source_name == "faceless" else hopper_png
    path = astronaut_video if name == "video" else bad_inputs.get(name)
    return kind, name, path, source


def test_bad_inputs_fail_clearly_while_another_job_completes(
    client: JobClient, stack: EmbeddedStack, bad_inputs: dict[str, Path], astronaut_video: Path,
    hopper_png: bytes, capsys: pytest.CaptureFixture[str],
) -> None:
    running = client.submit(hopper_png, target_path=astronaut_video, selector="one")
    for case, (_, _, code, words) in CASES.items():
        kind, name, path, source = _inputs(case, bad_inputs, astronaut_video, hopper_png)
        with pytest.raises(SwaplineError) as raised:
            if kind == "uri":
                client.submit(source, target_uri=name)
            else:
                client.submit(source, target_path=path)
        assert raised.value.code == code, f"{case}: {raised.value.code} {raised.value.message}"
        assert words in raised.value.message.lower(), f"{case}: {raised.value.message}"
        failed = client.list(limit=1)[0]
        assert failed.state == jobs_pb2.JOB_STATE_FAILED, case
        assert failed.error.code == code.value[0] and words in failed.error.message.lower(), case

    output = bad_inputs["empty"].with_name("never-written.mp4")
    exit_code = cli_main(["--gateway", stack.gateway_address, "run", "--source", str(bad_inputs["faceless"]),
                          "--target", str(astronaut_video), "--output", str(output), "--quiet"])
    assert exit_code != 0
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert not output.exists()

    finished = wait_for_end(client, running.id)
    assert finished.state == jobs_pb2.JOB_STATE_SUCCEEDED, finished.error.message

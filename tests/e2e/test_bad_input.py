"""Bad input: the right status, a message naming the problem, a FAILED job, a non-zero CLI; others go on."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import av
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
    huge_source = media / "huge-source.png"
    huge_source.write_bytes(png_header(30000, 30000))
    return {
        "not_media": not_media,
        "truncated": truncated,
        "empty": empty,
        "faceless": faceless,
        "huge_source": huge_source,
        "oversized": oversized_video(media / "oversized.mp4"),
    }


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG claiming width x height: all a decoder needs to allocate the whole picture."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def oversized_video(path: Path) -> Path:
    """Two black 6000x6000 frames (36 Mpx each, past the 35.7 Mpx limit): 100 KB on disk, 216 MB as RGB."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 6000, 6000, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((9000, 6000), np.uint8), format="yuv420p")
        for index in range(2):
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


CASES = {
    # name: (target as upload or uri, source, expected code, words the message must contain)
    "missing file": ("uri:no/such/video.mp4", "hopper", grpc.StatusCode.NOT_FOUND, "does not exist"),
    "not a video": ("upload:not_media", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "not a video or image"),
    "truncated mp4": ("upload:truncated", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "faceless source": ("upload:video", "faceless", grpc.StatusCode.FAILED_PRECONDITION, "no face"),
    "zero-byte upload": ("upload:empty", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "outside media root": ("uri:../../etc/passwd", "hopper", grpc.StatusCode.PERMISSION_DENIED, "outside"),
    "nul byte in uri": ("uri:clip\x00.mp4", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "control character"),
    "300-character file name": (f"uri:{'x' * 296}.mp4", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "limit is 255"),
    "megabyte uri": ("uri:" + "a/" * 500_000, "hopper", grpc.StatusCode.INVALID_ARGUMENT, "limit is 1024"),
    "huge source image": ("upload:video", "huge_source", grpc.StatusCode.INVALID_ARGUMENT, "30000x30000"),
    "oversized video": ("upload:oversized", "hopper", grpc.StatusCode.INVALID_ARGUMENT, "6000x6000"),
}
# A message names the problem; it never shows where the server keeps its files nor echoes a long input whole.
MAX_MESSAGE_CHARACTERS = 300


def _inputs(case: str, bad_inputs: dict[str, Path], astronaut_video: Path, hopper_png: bytes) -> tuple:
    target, source_name, _, _ = CASES[case]
    kind, name = target.split(":", 1)
    source = hopper_png if source_name == "hopper" else bad_inputs[source_name].read_bytes()
    path = astronaut_video if name == "video" else bad_inputs.get(name)
    return kind, name, path, source


def _problems(case: str, error: SwaplineError, failed: jobs_pb2.Job, stack: EmbeddedStack) -> list[str]:
    """What is wrong with the answer to a bad input and with the FAILED job it left; every case is checked."""
    _, _, code, words = CASES[case]
    message = error.message
    checks = {
        f"answered {error.code.name}, not {code.name}": error.code == code,
        f"does not say {words!r}": words in message.lower(),
        "shows a server path": str(stack.options.work_dir) not in message,
        f"is {len(message)} characters long": len(message) < MAX_MESSAGE_CHARACTERS,
        "left no FAILED job with the same status": failed.state == jobs_pb2.JOB_STATE_FAILED
        and failed.error.code == code.value[0]
        and words in failed.error.message.lower(),
    }
    return [f"{case}: {problem}: {message[:200]}" for problem, passed in checks.items() if not passed]


def test_bad_inputs_fail_clearly_while_another_job_completes(
    client: JobClient,
    stack: EmbeddedStack,
    bad_inputs: dict[str, Path],
    astronaut_video: Path,
    hopper_png: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = client.submit(hopper_png, target_path=astronaut_video, selector="one")
    problems: list[str] = []
    for case in CASES:
        kind, name, path, source = _inputs(case, bad_inputs, astronaut_video, hopper_png)
        with pytest.raises(SwaplineError) as raised:
            if kind == "uri":
                client.submit(source, target_uri=name)
            else:
                client.submit(source, target_path=path)
        problems += _problems(case, raised.value, client.list(limit=1)[0], stack)
    assert problems == []

    output = bad_inputs["empty"].with_name("never-written.mp4")
    exit_code = cli_main(
        [
            "--gateway",
            stack.gateway_address,
            "run",
            "--source",
            str(bad_inputs["faceless"]),
            "--target",
            str(astronaut_video),
            "--output",
            str(output),
            "--quiet",
        ]
    )
    assert exit_code != 0
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert not output.exists()

    finished = wait_for_end(client, running.id)
    assert finished.state == jobs_pb2.JOB_STATE_SUCCEEDED, finished.error.message

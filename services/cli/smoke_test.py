"""`python -m services.cli.smoke_test`: submits a tiny sample job to a running gateway and checks that it succeeds.

The chart's `helm test` hook runs it (templates/tests/), on the gateway's image. The sample needs nothing from
outside the package: one second of a small video made from the photo matplotlib ships (Grace Hopper), and the
same photo as the source face. The test passes when the job SUCCEEDED and its output decodes to the job's
frames: every stage (decode, detect, swap, paste, encode, join) ran. Exit status 0 then, 1 with the reason
otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import av

from services.cli import sample_media
from services.cli.job_client import JobClient, job_error, state_name
from services.cli.job_follower import Reconnecting, Reconnector, follow_job
from services.common.errors import FailedPrecondition, SwaplineError
from services.common.media_paths import temporary_path
from services.common.token_file import TokenFileError, parse_internal_token, read_secret_file
from swapline.jobs.v1 import jobs_pb2

SAMPLE_SECONDS = 1.0
SAMPLE_SIZE = (320, 240)
# Seconds one call may take; the job itself may take longer (queued behind others, models warming up).
CALL_TIMEOUT_SECONDS = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.cli.smoke_test",
        description="Submit a tiny sample job to a running gateway and check that it succeeds.",
    )
    parser.add_argument(
        "--gateway", required=True, help="the gateway's public gRPC address: host:port, dns:///host:port"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the bearer token (a tenant's, or the internal one); without it no token is sent",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="PEM file of the CA that signed the gateway's certificate; without it the call is plaintext",
    )
    return parser


def client_from(args: argparse.Namespace) -> JobClient:
    token = ""
    if args.token_file is not None:
        text = read_secret_file(args.token_file, "--token-file", "").decode("ascii", errors="replace")
        try:
            token = parse_internal_token(text)
        except TokenFileError as error:
            raise FailedPrecondition(f"--token-file {args.token_file}: {error}") from None
    return JobClient(args.gateway, CALL_TIMEOUT_SECONDS, token, args.ca_file)


class ProgressLog:
    """Prints a line when the job's state or stage changes: enough to see in `helm test --logs` where it stood."""

    def __init__(self) -> None:
        self._last: tuple[int, str] | None = None

    def event(self, event: jobs_pb2.JobEvent) -> None:
        if (event.state, event.stage) == self._last:
            return
        self._last = (event.state, event.stage)
        stage = f" ({event.stage})" if event.stage else ""
        say(f"job {event.job_id}: {state_name(event.state)}{stage}, {event.frames_done}/{event.frames_total} frames")

    @staticmethod
    def reconnecting(retry: Reconnecting) -> None:
        say(f"gateway unavailable for {retry.outage_seconds:.0f} s; trying again in {retry.retry_in_seconds:.1f} s")


def say(line: str) -> None:
    print(line, flush=True)


def make_sample(folder: Path) -> tuple[bytes, Path]:
    """The source face (PNG) and the target clip, written under a temporary name and renamed."""
    photo = sample_media.grace_hopper_photo()
    clip = folder / "smoke-test.mp4"
    partial = temporary_path(clip)
    sample_media.make_face_video(partial, photo, seconds=SAMPLE_SECONDS, size=SAMPLE_SIZE, audio=False)
    partial.replace(clip)
    return sample_media.encode_png(photo), clip


def decoded_frames(video: Path) -> int:
    with av.open(str(video)) as container:
        return sum(1 for _ in container.decode(video=0))


def smoke_test(client: JobClient, folder: Path) -> jobs_pb2.Job:
    """The finished job; FailedPrecondition (or the job's own error) when it did not succeed whole."""
    source, clip = make_sample(folder)
    job = client.submit(source, target_path=clip)
    say(f"submitted job {job.id}: {job.frames_total} frames in {job.chunks_total} chunks")
    progress = ProgressLog()
    finished = follow_job(client, job.id, progress.event, Reconnector(progress.reconnecting))
    error = job_error(finished)
    if error is not None:
        raise error
    if finished.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise FailedPrecondition(f"job {job.id} ended {state_name(finished.state)}, not succeeded")
    output = client.fetch(job.id, jobs_pb2.ARTIFACT_OUTPUT, folder / "output.mp4")
    frames = decoded_frames(output)
    if frames != finished.frames_total or frames == 0:
        raise FailedPrecondition(
            f"job {job.id} succeeded, but its output holds {frames} frames, not {finished.frames_total}"
        )
    return finished


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    say(f"smoke test of the gateway at {args.gateway}")
    try:
        with client_from(args) as client, tempfile.TemporaryDirectory(prefix="swapline-smoke-") as folder:
            job = smoke_test(client, Path(folder))
    except SwaplineError as error:
        print(f"smoke test failed: {error.code.name}: {error.message}", file=sys.stderr, flush=True)
        return 1
    say(f"smoke test passed: job {job.id} swapped {job.frames_total} frames in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

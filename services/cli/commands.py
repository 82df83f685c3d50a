"""The swapline subcommands; each returns the process exit code."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from google.protobuf.json_format import MessageToDict

from services.cli.embedded_stack import GATEWAY_ENV, EmbeddedStack, ServiceRestart, StackOptions
from services.cli.gpu_layout import describe_layout
from services.cli.job_client import JobClient, job_error, state_name
from services.cli.job_follower import Reconnecting, Reconnector, WatchingClient, follow_job
from services.cli.progress_bar import ProgressBar
from services.cli.stack_credentials import StackCredentials
from services.common.errors import InvalidArgument, NotFound, SwaplineError
from services.common.media_paths import temporary_path, write_file
from services.common.tenant_context import LOCAL_TENANT
from swapline.jobs.v1 import jobs_pb2


def fail(error: SwaplineError) -> int:
    print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
    return 1


def read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise NotFound(f"{what} {str(path)!r} does not exist")
    return path.read_bytes()


def stack_options(args: argparse.Namespace, work_dir: Path, gateway_port: int = 0) -> StackOptions:
    return StackOptions(
        work_dir=work_dir,
        media_root=work_dir / "media",
        gateway_port=gateway_port,
        workers=args.workers,
        frame_service_replicas=args.frame_service_replicas,
        secure=args.secure or args.mtls,
        mutual_tls=args.mtls,
        tenants=tuple(args.tenant or StackOptions.tenants),
        gpu_memory_budget_bytes=args.gpu_memory_budget,
    )


@contextmanager
def started_stack(options: StackOptions) -> Iterator[EmbeddedStack]:
    """The embedded stack, started, with the sizes it chose for this machine's GPUs and cores printed."""
    with EmbeddedStack(options, on_restart=report_restart) as stack:
        print(f"embedded stack: {describe_layout(stack.layout)}", file=sys.stderr, flush=True)
        yield stack


@contextmanager
def client_for(args: argparse.Namespace, default_workdir: Path | None = None) -> Iterator[JobClient]:
    """A client of the gateway named by --gateway or SWAPLINE_GATEWAY (with SWAPLINE_TOKEN and SWAPLINE_CA_FILE),
    or of an embedded stack started for this command, with that stack's credentials.

    The embedded stack works in --workdir, else in `default_workdir` (kept, so that a later command finds its
    store), else in a temporary directory removed afterwards.
    """
    if args.gateway:
        with JobClient.from_env(args.gateway) as client:
            yield client
        return
    kept_dir = Path(args.workdir) if args.workdir else default_workdir
    work_dir = kept_dir if kept_dir is not None else Path(tempfile.mkdtemp(prefix="swapline-"))
    print(f"starting the embedded stack in {work_dir} ...", file=sys.stderr)
    try:
        with (
            started_stack(stack_options(args, work_dir)) as stack,
            stack.job_client() as client,
        ):
            yield client
    finally:
        if kept_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def report_restart(restart: ServiceRestart) -> None:
    print(restart.describe(), file=sys.stderr, flush=True)


def follow(client: WatchingClient, job_id: str, quiet: bool = False) -> jobs_pb2.Job:
    """Shows progress until the job ends; waits out gateway restarts and dropped connections."""
    bar = None if quiet else ProgressBar()

    def reconnecting(retry: Reconnecting) -> None:
        message = (
            f"gateway unavailable for {retry.outage_seconds:.0f} s ({retry.error.message[:80]});"
            f" reconnecting in {retry.retry_in_seconds:.1f} s"
        )
        if bar is not None:
            bar.note(message)
        else:
            print(message, file=sys.stderr, flush=True)

    job = follow_job(client, job_id, bar.update if bar is not None else lambda _: None, Reconnector(reconnecting))
    if bar is not None:
        bar.finish()
    return job


def save_output(client: JobClient, job: jobs_pb2.Job, output: Path) -> Path:
    """Writes the result to `output`; an image result is re-encoded when the suffix asks for another format.

    The download goes to a hidden temporary name beside `output`, renamed once whole: `output` is never partial.
    """
    fetched = client.fetch(job.id, jobs_pb2.ARTIFACT_OUTPUT, temporary_path(output))
    produced_suffix = Path(job.output_uri).suffix.lower()
    wanted_suffix = output.suffix.lower()
    is_image = produced_suffix in {".png", ".jpg", ".jpeg"}
    try:
        if is_image and wanted_suffix != produced_suffix:
            image = cv2.imdecode(np.frombuffer(fetched.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
            ok, encoded = cv2.imencode(wanted_suffix or ".png", image)
            if not ok:
                raise InvalidArgument(f"cannot write an image as {output.name!r}")
            write_file(output, encoded.tobytes())
        else:
            fetched.replace(output)
    finally:
        fetched.unlink(missing_ok=True)
    return output


def run(args: argparse.Namespace) -> int:
    source = read_file(Path(args.source), "source image")
    reference = read_file(Path(args.reference), "reference image") if args.reference else b""
    target = Path(args.target)
    if not args.target_uri and not target.is_file():
        raise NotFound(f"target {args.target!r} does not exist")
    with client_for(args) as client:
        job = client.submit(
            source,
            target_path=None if args.target_uri else target,
            target_uri=args.target if args.target_uri else "",
            selector=args.selector,
            reference_image=reference,
            crf=args.crf,
            preset=args.preset,
            swapper=args.swapper,
            detector=args.detector,
        )
        print(f"job {job.id} submitted", file=sys.stderr)
        job = follow(client, job.id, quiet=args.quiet)
        error = job_error(job)
        if error is not None:
            return fail(error)
        if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            print(f"job {job.id} ended {state_name(job.state)}", file=sys.stderr)
            return 1
        output = save_output(client, job, Path(args.output))
        print(f"output: {output}")
        if args.report:
            save_report(client, job.id, Path(args.report))
    return 0


REPORT_ARTIFACTS: tuple[tuple[str, jobs_pb2.Artifact, str], ...] = (
    ("report", jobs_pb2.ARTIFACT_REPORT, "report.json"),
    ("GPU trend chart", jobs_pb2.ARTIFACT_GPU_TREND_CHART, "gpu_trend.png"),
    ("GPU trend samples", jobs_pb2.ARTIFACT_GPU_TREND_CSV, "gpu_trend.csv"),
)


def save_report(client: JobClient, job_id: str, report_dir: Path) -> None:
    """The report, then its GPU trend chart and CSV; a gateway without the chart still gives the report."""
    for what, artifact, filename in REPORT_ARTIFACTS:
        try:
            path = client.fetch(job_id, artifact, report_dir / filename)
        except SwaplineError as error:
            if artifact == jobs_pb2.ARTIFACT_REPORT:
                raise
            print(f"warning: no {what}: {error.message}", file=sys.stderr)
            continue
        print(f"{what}: {path}")
    summary = json.loads((report_dir / "report.json").read_text())
    print(
        f"{summary.get('frames', 0)} frames, {summary.get('faces', 0)} faces swapped,"
        f" {summary.get('chunks', 0)} chunks, {summary.get('fps', 0.0):.1f} fps end to end"
    )
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


OPEN_WARNING = (
    "WARNING: this stack is OPEN: plaintext gRPC (no TLS), no tokens, and every job belongs to the tenant"
    f" {LOCAL_TENANT!r}. It listens on 127.0.0.1 only; anyone who can run a program on this machine can use it."
    " Run `swapline up --secure` for TLS and tokens."
)


class RunningStack(Protocol):
    """What `swapline up` tells about a started stack."""

    @property
    def gateway_address(self) -> str: ...

    @property
    def credentials(self) -> StackCredentials | None: ...

    def client_env(self, tenant: str = "") -> dict[str, str]: ...


def announce(stack: RunningStack, options: StackOptions) -> None:
    """Where the gateway is, whether it is open (a warning on stderr) or secure, and the `export` line to copy."""
    print(f"gateway listening on {stack.gateway_address}; media root {options.media_root.resolve()}")
    credentials = stack.credentials
    if credentials is None:
        print(OPEN_WARNING, file=sys.stderr)
    else:
        mode = "mutual TLS between services" if options.mutual_tls else "TLS"
        print(f"secure: {mode}, bearer tokens; credentials in {credentials.directory} (regenerated at every start)")
        print(f"tenants and their tokens: {credentials.tenant_tokens_file} (`TOKEN TENANT` lines)")
    exports = " ".join(f"{name}={value}" for name, value in stack.client_env().items())
    tenant = f"  # as tenant {credentials.first_tenant!r}" if credentials is not None else ""
    print(f"export {exports}{tenant}", flush=True)


def up(args: argparse.Namespace) -> int:
    work_dir = Path(args.workdir or "swapline-data")
    options = stack_options(args, work_dir, gateway_port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with started_stack(options) as stack:
        announce(stack, options)
        stop.wait()
        print(f"stopping; restarts: {restarts_summary(stack.restarts())}", file=sys.stderr)
    return 0


def restarts_summary(restarts: dict[str, int]) -> str:
    restarted = [f"{name} {count}" for name, count in restarts.items() if count]
    return ", ".join(restarted) or "none"


def require_gateway(args: argparse.Namespace) -> str:
    if not args.gateway:
        raise InvalidArgument(f"no gateway: set {GATEWAY_ENV} or pass --gateway (or start one with `swapline up`)")
    return str(args.gateway)


def submit(args: argparse.Namespace) -> int:
    source = read_file(Path(args.source), "source image")
    reference = read_file(Path(args.reference), "reference image") if args.reference else b""
    with JobClient.from_env(require_gateway(args)) as client:
        upload = None if args.target_uri else Path(args.target)
        if upload is not None and not upload.is_file():
            raise NotFound(f"target {args.target!r} does not exist")
        job = client.submit(
            source,
            target_path=upload,
            target_uri=args.target if args.target_uri else "",
            selector=args.selector,
            reference_image=reference,
            crf=args.crf,
            preset=args.preset,
            swapper=args.swapper,
            detector=args.detector,
        )
    print(job.id)
    return 0


def watch(args: argparse.Namespace) -> int:
    with JobClient.from_env(require_gateway(args)) as client:
        job = follow(client, args.job_id)
    error = job_error(job)
    return fail(error) if error is not None else (0 if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1)


def print_job(job: jobs_pb2.Job) -> None:
    print(json.dumps(MessageToDict(job, preserving_proto_field_name=True), indent=2))


def get(args: argparse.Namespace) -> int:
    with JobClient.from_env(require_gateway(args)) as client:
        print_job(client.get(args.job_id))
    return 0


def cancel(args: argparse.Namespace) -> int:
    with JobClient.from_env(require_gateway(args)) as client:
        print_job(client.cancel(args.job_id))
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    with JobClient.from_env(require_gateway(args)) as client:
        for job in client.list(args.limit):
            print(f"{job.id}  {state_name(job.state):10} {job.frames_done}/{job.frames_total} frames  {job.target_uri}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from services.cli import sample_media

    work_dir = Path(args.workdir)
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / "sample-astronaut-720p.mp4"
    source = work_dir / "source-grace-hopper.png"
    print(f"building the sample video {target} from package-shipped photos ...", file=sys.stderr)
    sample_media.make_face_video(target, sample_media.astronaut_photo())
    source.write_bytes(sample_media.encode_png(sample_media.grace_hopper_photo()))
    run_args = demo_run_arguments(args, source, target, work_dir)
    code = run(run_args)
    if code == 0:
        print(f"demo done: swapped video {work_dir / 'output.mp4'}, report {work_dir / 'report'}")
    return code


def demo_run_arguments(args: argparse.Namespace, source: Path, target: Path, work_dir: Path) -> argparse.Namespace:
    """`swapline run`'s arguments for the demo, parsed by run's own parser so every option has its default."""
    from services.cli.__main__ import build_parser

    command = ["run", "--source", str(source), "--target", str(target), "--output", str(work_dir / "output.mp4")]
    command += ["--report", str(work_dir / "report"), "--workdir", str(work_dir / "stack")]
    for flag, size in (("--workers", args.workers), ("--frame-service-replicas", args.frame_service_replicas)):
        if size is not None:
            command += [flag, str(size)]
    command += ["--gpu-memory-budget", str(args.gpu_memory_budget)]
    command += [flag for flag, chosen in (("--secure", args.secure), ("--mtls", args.mtls)) if chosen]
    for tenant in args.tenant:
        command += ["--tenant", tenant]
    run_args = build_parser().parse_args(command)
    run_args.gateway = args.gateway
    return run_args


def default_gateway() -> str:
    return os.environ.get(GATEWAY_ENV, "")

"""Faults injected into the real stack, run as `swapline up --secure` runs it (TLS, tenant tokens).

One stack serves every case, in an order where they cannot interfere: the burst first (its baseline
needs processes that were never restarted), then cancelled streams, then a SIGKILL of each process
while it holds an open stream or request for a job, then an outage as long as the retry budget,
then a stall past the deadline. Every wait polls a condition under a deadline.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.cli import sample_media
from services.cli.embedded_stack import TRITON_NAME, EmbeddedStack, StackOptions
from services.cli.job_client import TERMINAL_STATES, JobClient
from services.cli.job_follower import Reconnector, follow_job
from services.common.media_opener import open_media
from swapline.jobs.v1 import jobs_pb2

pytestmark = pytest.mark.e2e

RETRY_BUDGET_SECONDS = 15.0
# Longer than the outage test's outage plus a restart: a chunk waiting out the outage is not a stall.
STALL_DEADLINE_SECONDS = 25.0
CLIP_FRAMES = 100
# Any job of these tests ends well within this, faults included; one that does not has hung.
JOB_TIMEOUT_SECONDS = 150.0
BURST_JOBS = 50
WARM_UP_JOBS = 4
# Back to baseline: within 10% or 64 MB of resident memory per process, whichever is larger.
MEMORY_SLACK_FRACTION = 0.10
MEMORY_SLACK_BYTES = 64 * 1024 * 1024
FAULT_ENV = {
    # One-second chunks: a 4 s clip has four, so a kill lands with chunks done and chunks to go.
    "SWAPLINE_GATEWAY_CHUNK_SECONDS": "1",
    "SWAPLINE_GATEWAY_LEASE_SECONDS": "10",
    "SWAPLINE_GATEWAY_RETRY_BUDGET_SECONDS": str(RETRY_BUDGET_SECONDS),
    "SWAPLINE_GATEWAY_RETRY_MAX_BACKOFF_SECONDS": "2",
    "SWAPLINE_GATEWAY_STALL_DEADLINE_SECONDS": str(STALL_DEADLINE_SECONDS),
    # Progress reaches the gateway twice a second, so "midway" (some frames done) is seen while the first
    # chunks' Decode calls are still open: with the default 5 s, the decoder case sometimes found its job
    # past its last Decode call before any frame was reported done.
    "SWAPLINE_WORKER_HEARTBEAT_SECONDS": "0.5",
}


@dataclass(frozen=True)
class Inputs:
    source: bytes
    clip: Path
    short_clip: Path


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    work_dir = tmp_path_factory.mktemp("fault-stack")
    options = StackOptions(
        work_dir=work_dir, media_root=work_dir / "media", workers=2, secure=True, extra_env=FAULT_ENV
    )
    with EmbeddedStack(options) as running:
        yield running


@pytest.fixture(scope="module")
def alice(fault_stack: EmbeddedStack) -> Iterator[JobClient]:
    with fault_stack.job_client("alice") as client:
        yield client


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    folder = tmp_path_factory.mktemp("fault-inputs")
    photo = sample_media.astronaut_photo()
    clip = sample_media.make_face_video(folder / "clip.mp4", photo, seconds=4.0, size=(480, 272), fps=25)
    short = sample_media.make_face_video(
        folder / "short.mp4", photo, seconds=0.4, size=(320, 180), fps=10, keyframe_seconds=0.4
    )
    return Inputs(sample_media.encode_png(sample_media.grace_hopper_photo()), clip, short)


def poll(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def follow_to_end(client: JobClient, job_id: str, timeout: float = JOB_TIMEOUT_SECONDS) -> jobs_pb2.Job:
    """Follows the job through gateway restarts, as `swapline watch` does; a job that hangs fails the test."""
    follower = ThreadPoolExecutor(max_workers=1)
    ending = follower.submit(
        follow_job, client, job_id, lambda _event: None, Reconnector(lambda _retry: None, budget_seconds=180)
    )
    try:
        return ending.result(timeout=timeout)
    except FutureTimeout:
        raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s") from None
    finally:
        # Not waited for: a follower of a hung job ends once the stack stops and its watch fails.
        follower.shutdown(wait=False)


def video_frames(path: Path) -> int:
    with open_media(path) as container:
        return sum(1 for _ in container.demux(video=0) if _.size)


def assert_succeeded_whole(client: JobClient, job: jobs_pb2.Job, frames: int, tmp_path: Path) -> None:
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert (job.frames_total, job.frames_done) == (frames, frames)
    output = client.fetch(job.id, jobs_pb2.ARTIFACT_OUTPUT, tmp_path / f"{job.id}.mp4")
    assert video_frames(output) == frames


def in_flight(metrics_text: str, method: str) -> float:
    prefix = f'swapline_rpc_in_flight{{method="{method}"}} '
    return sum(float(line[len(prefix) :]) for line in metrics_text.splitlines() if line.startswith(prefix))


def metrics_of(stack: EmbeddedStack, name: str) -> str:
    """A service's metrics, over HTTPS with its own certificate when the stack is secure."""
    if stack.credentials is None:
        url, context = f"http://{stack.metrics_address(name)}/metrics", None
    else:
        url, context = (
            f"https://{stack.metrics_address(name)}/metrics",
            ssl.create_default_context(cafile=str(stack.credentials.ca_file)),
        )
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return str(response.read().decode())


def leased_workers(stack: EmbeddedStack, job_id: str) -> list[str]:
    """The stack names of the workers holding a lease on one of the job's chunks, from the gateway's store."""
    database = stack.options.media_root / "swapline.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
        rows = connection.execute(
            "SELECT worker_id FROM chunks WHERE job_id = ? AND state = 'LEASED'", (job_id,)
        ).fetchall()
    return [str(worker_id).removeprefix("embedded-") for (worker_id,) in rows]


def midway(client: JobClient, job_id: str) -> bool:
    job = client.get(job_id)
    if job.state in TERMINAL_STATES:
        raise AssertionError(f"job {job_id} ended ({job.state}) before the fault could be injected")
    return 0 < job.frames_done < job.frames_total


def running(client: JobClient, job_id: str) -> bool:
    job = client.get(job_id)
    if job.state in TERMINAL_STATES:
        raise AssertionError(f"job {job_id} ended ({job.state}) before the fault could be injected")
    return job.state == jobs_pb2.JOB_STATE_RUNNING


def wait_until_held(client: JobClient, job_id: str, holder: Callable[[str], str | None]) -> None:
    """Until the process to test holds an open call for the running job. Not "midway": a chunk's Decode call can
    close before any frame of the job is reported done, and the job then ended before both were seen at once."""

    def held() -> bool:
        return running(client, job_id) and holder(job_id) is not None

    poll(held, 120, f"job {job_id} running with an open call on the process to test", interval=0.02)


def stage_holds(stack: EmbeddedStack, service: str, method: str) -> Callable[[str], str | None]:
    """The service holds an open `method` call while the job is midway."""

    def holder(job_id: str) -> str | None:
        return service if in_flight(metrics_of(stack, service), method) > 0 else None

    return holder


def worker_holds(stack: EmbeddedStack) -> Callable[[str], str | None]:
    def holder(job_id: str) -> str | None:
        workers = leased_workers(stack, job_id)
        return workers[0] if workers else None

    return holder


def triton_holds(stack: EmbeddedStack) -> Callable[[str], str | None]:
    """tritonserver is serving the job's detection: the detector has a Detect call open on it."""

    def holder(job_id: str) -> str | None:
        detecting = in_flight(metrics_of(stack, "detector"), "Detect") > 0
        return TRITON_NAME if detecting and leased_workers(stack, job_id) else None

    return holder


def gateway_holds(stack: EmbeddedStack) -> Callable[[str], str | None]:
    def holder(job_id: str) -> str | None:
        return "gateway" if in_flight(metrics_of(stack, "gateway"), "WatchJob") > 0 else None

    return holder


@dataclass(frozen=True)
class Kill:
    name: str
    pid: int
    frames_done: int


def kill_midway(
    stack: EmbeddedStack, client: JobClient, inputs: Inputs, holder: Callable[[str], str | None]
) -> tuple[jobs_pb2.Job, Kill]:
    """Submits a job, SIGKILLs the process `holder` names once the job is midway and that process holds
    an open call for it, and follows the job to its end."""
    job = client.submit(inputs.source, target_path=inputs.clip)
    kills: list[Kill] = []

    def kill_when_held() -> bool:
        if not midway(client, job.id):
            return False
        name = holder(job.id)
        frames_done = client.get(job.id).frames_done
        if name is None or not 0 < frames_done < CLIP_FRAMES:
            return False
        pid = stack.pid(name)
        os.kill(pid, signal.SIGKILL)
        kills.append(Kill(name, pid, frames_done))
        return True

    with ThreadPoolExecutor(max_workers=1) as watcher:
        # The gateway case needs a WatchJob open on it; the others follow the job the same way.
        ended = watcher.submit(follow_to_end, client, job.id)
        poll(kill_when_held, 120, f"job {job.id} midway with its holder busy", interval=0.02)
        return ended.result(), kills[0]


def test_burst_of_50_jobs_all_succeed_and_resources_return_to_baseline(
    fault_stack: EmbeddedStack, alice: JobClient, inputs: Inputs, tmp_path: Path
) -> None:
    def submit_and_follow(_index: int) -> jobs_pb2.Job:
        with fault_stack.job_client("alice") as client:
            return follow_to_end(client, client.submit(inputs.source, target_path=inputs.short_clip).id)

    # The baseline is the steady state of a few concurrent jobs (each worker's second connection, the
    # detector's shared-memory regions, the report thread's fonts): a leak grows with the 50 jobs after it.
    with ThreadPoolExecutor(max_workers=WARM_UP_JOBS) as pool:
        warm_up = list(pool.map(submit_and_follow, range(WARM_UP_JOBS)))
    assert [job.state for job in warm_up] == [jobs_pb2.JOB_STATE_SUCCEEDED] * WARM_UP_JOBS
    names = [*fault_stack.supervisor.names(), TRITON_NAME]
    baseline = {name: process_usage(fault_stack.pid(name)) for name in names}
    shm_before = shared_memory_entries()

    def burst() -> None:
        with ThreadPoolExecutor(max_workers=BURST_JOBS) as pool:
            finished = list(pool.map(submit_and_follow, range(BURST_JOBS)))
        assert [job.state for job in finished] == [jobs_pb2.JOB_STATE_SUCCEEDED] * BURST_JOBS
        assert {job.frames_done for job in finished} == {warm_up[0].frames_total}
        assert not any(fault_stack.restarts().values())

    # Memory is compared between two bursts: 50 jobs at once raise tritonserver's buffers to a high-water
    # mark that 4 do not reach (up to +83 MB without a leak), while a leak grows again with the second 50.
    burst()
    memory_baseline = {name: process_usage(fault_stack.pid(name)).rss_bytes for name in names}
    burst()

    def unsettled() -> list[str]:
        extra_shm = sorted(shared_memory_entries() - shm_before)
        fds = {name: (baseline[name].fds, process_usage(fault_stack.pid(name)).fds) for name in names}
        grown = [f"{name}: {before} -> {now} fds" for name, (before, now) in fds.items() if now > before]
        return [*grown, *(f"/dev/shm/{entry}" for entry in extra_shm)]

    try:
        poll(lambda: not unsettled(), 90, "file descriptors and /dev/shm back to their baseline", interval=0.5)
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}: {unsettled()}") from None
    for name in names:
        before, after = memory_baseline[name], process_usage(fault_stack.pid(name)).rss_bytes
        slack = max(MEMORY_SLACK_BYTES, MEMORY_SLACK_FRACTION * before)
        assert after <= before + slack, (name, before, after)


@dataclass(frozen=True)
class ProcessUsage:
    rss_bytes: int
    fds: int


def process_usage(pid: int) -> ProcessUsage:
    """Resident memory of the process and its children (tritonserver's model stubs), and its open fds."""
    pids = [pid, *descendants(pid)]
    rss = 0
    for member in pids:
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
    return ProcessUsage(rss, len(os.listdir(f"/proc/{pid}/fd")))


def descendants(pid: int) -> list[int]:
    children_file = Path(f"/proc/{pid}/task/{pid}/children")
    children = [int(child) for child in children_file.read_text().split()] if children_file.exists() else []
    return [grandchild for child in children for grandchild in (child, *descendants(child))]


def shared_memory_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def test_cancelled_jobs_cancel_their_streams_without_a_crash_or_a_leftover_file(
    fault_stack: EmbeddedStack, alice: JobClient, inputs: Inputs
) -> None:
    pids = {name: fault_stack.pid(name) for name in fault_stack.supervisor.names()}
    for holder in (stage_holds(fault_stack, "decoder", "Decode"), stage_holds(fault_stack, "encoder", "EncodeSegment")):
        job = alice.submit(inputs.source, target_path=inputs.clip)
        wait_until_held(alice, job.id, holder)
        cancelled = alice.cancel(job.id)
        assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    media_root = fault_stack.options.media_root

    def quiet() -> bool:
        held = [
            name
            for name, method in (("decoder", "Decode"), ("encoder", "EncodeSegment"))
            if in_flight(metrics_of(fault_stack, name), method) > 0
        ]
        return not held and not list(media_root.rglob("*.part"))

    poll(quiet, 60, "the cancelled streams to end and their partial files to go", interval=0.2)
    assert {name: fault_stack.pid(name) for name in pids} == pids
    assert not any(fault_stack.restarts().values())


KILL_CASES = ["worker", "decoder", "detector", "encoder", TRITON_NAME, "gateway"]


@pytest.mark.parametrize("victim", KILL_CASES)
def test_sigkill_midway_still_succeeds_with_every_frame(
    fault_stack: EmbeddedStack, alice: JobClient, inputs: Inputs, victim: str, tmp_path: Path
) -> None:
    holders = {
        "worker": worker_holds(fault_stack),
        "decoder": stage_holds(fault_stack, "decoder", "Decode"),
        "detector": stage_holds(fault_stack, "detector", "Detect"),
        "encoder": stage_holds(fault_stack, "encoder", "EncodeSegment"),
        TRITON_NAME: triton_holds(fault_stack),
        "gateway": gateway_holds(fault_stack),
    }
    restarts_before = fault_stack.restarts()
    job, kill = kill_midway(fault_stack, alice, inputs, holders[victim])
    assert kill.name.startswith(victim) and 0 < kill.frames_done < CLIP_FRAMES
    fault_stack.wait_restarted(kill.name, kill.pid, timeout=120)
    assert fault_stack.restarts()[kill.name] == restarts_before[kill.name] + 1
    assert_succeeded_whole(alice, job, CLIP_FRAMES, tmp_path)


def test_an_outage_as_long_as_the_retry_budget_loses_no_job(
    fault_stack: EmbeddedStack, alice: JobClient, inputs: Inputs, tmp_path: Path
) -> None:
    job = alice.submit(inputs.source, target_path=inputs.clip)
    holder = stage_holds(fault_stack, "encoder", "EncodeSegment")
    wait_until_held(alice, job.id, holder)
    with fault_stack.supervisor.held("encoder"):
        os.kill(fault_stack.pid("encoder"), signal.SIGKILL)
        outage_started = time.monotonic()
        poll(
            lambda: time.monotonic() - outage_started >= RETRY_BUDGET_SECONDS,
            RETRY_BUDGET_SECONDS + 5,
            "the outage to last the retry budget",
            interval=0.5,
        )
        assert alice.get(job.id).state == jobs_pb2.JOB_STATE_RUNNING
    assert_succeeded_whole(alice, follow_to_end(alice, job.id), CLIP_FRAMES, tmp_path)


def test_a_stalled_job_fails_with_deadline_exceeded(
    fault_stack: EmbeddedStack, alice: JobClient, inputs: Inputs
) -> None:
    job = alice.submit(inputs.source, target_path=inputs.clip)
    holder = stage_holds(fault_stack, "encoder", "EncodeSegment")
    wait_until_held(alice, job.id, holder)
    encoder = fault_stack.pid("encoder")
    os.kill(encoder, signal.SIGSTOP)
    try:
        ended = follow_to_end(alice, job.id)
    finally:
        os.kill(encoder, signal.SIGCONT)
    assert ended.state == jobs_pb2.JOB_STATE_FAILED
    assert ended.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], ended.error
    assert "no progress" in ended.error.message

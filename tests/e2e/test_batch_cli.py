"""`swapline batch` as a user runs it: 6 short clips times 2 faces on its own embedded stack, killed in the middle
(the CLI and the gateway), then run again; and a single job submitted while a batch runs on the shared stack."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.bench.batch_bench import make_clips, wait_for_job
from services.cli import sample_media
from services.cli.batch_outputs import check_output
from services.cli.embedded_stack import REPOSITORY_ROOT
from services.cli.job_client import JobClient
from services.common.media_probe import probe_media
from swapline.jobs.v1 import jobs_pb2

SOURCES = ("hopper", "astronaut")
CLIPS = 6
# Each check of a condition waits this long before looking again; the condition's deadline bounds the wait.
POLL_SECONDS = 0.2


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_clips(tmp_path_factory.mktemp("targets"), CLIPS)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    (folder / "hopper.png").write_bytes(sample_media.encode_png(sample_media.grace_hopper_photo()))
    (folder / "astronaut.png").write_bytes(sample_media.encode_png(sample_media.astronaut_photo()))
    return folder


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def stack_processes(work_dir: Path) -> dict[int, str]:
    """The processes of the embedded stack in work_dir, by pid: their command lines name its media root."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work_dir).encode() in environ and "orphan_reaper" not in command:
            found[int(entry.name)] = command
    return found


def complete_outputs(output: Path, clips: list[Path]) -> dict[str, tuple[int, int]]:
    """Complete outputs by name, with (inode, mtime_ns) to tell whether a later run rewrote them."""
    complete = {}
    for clip in clips:
        target = probe_media(clip)
        for face in SOURCES:
            path = output / f"{clip.stem}__{face}{clip.suffix}"
            if path.exists() and check_output(path, target).complete:
                info = path.stat()
                complete[path.name] = (info.st_ino, info.st_mtime_ns)
    return complete


def test_a_batch_killed_in_the_middle_resumes_with_no_duplicate_and_nothing_redone(
    clips: list[Path], faces: Path, tmp_path: Path
) -> None:
    output, work_dir = tmp_path / "out", tmp_path / "stack"
    output.mkdir()
    # A partial output from before: the batch must redo it.
    partial = output / f"{clips[0].stem}__hopper.mp4"
    partial.write_bytes(clips[0].read_bytes()[: clips[0].stat().st_size // 2])
    command = [sys.executable, "-m", "services.cli", "--gateway", "", "batch", "--sources", str(faces)]
    command += ["--targets", str(clips[0].parent), "--output", str(output), "--quiet"]
    command += ["--workdir", str(work_dir), "--workers", "2"]
    first = subprocess.Popen(command, cwd=REPOSITORY_ROOT, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(complete_outputs(output, clips)) >= 3, 300, "3 outputs of the first run")
    finally:
        gateways = [pid for pid, line in stack_processes(work_dir).items() if "services.gateway" in line]
        for pid in gateways:
            os.kill(pid, signal.SIGKILL)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert gateways, "the embedded stack's gateway was not found"
    done_before = complete_outputs(output, clips)
    assert 3 <= len(done_before) < 2 * CLIPS
    wait_until(lambda: not stack_processes(work_dir), 60, "the killed CLI's stack to stop")

    second = subprocess.run(command, cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "resuming batch" in second.stderr
    done_after = complete_outputs(output, clips)
    assert len(done_after) == 2 * CLIPS
    # Outputs complete before the kill were neither fetched nor made again.
    assert {name: done_after[name] for name in done_before} == done_before
    assert probe_media(partial).frame_count == probe_media(clips[0]).frame_count
    with sqlite3.connect(work_dir / "media" / "swapline.db") as store:
        batches = store.execute("SELECT id FROM batches").fetchall()
        jobs = store.execute("SELECT batch_id, COUNT(*) FROM jobs GROUP BY batch_id").fetchall()
    assert len(batches) == 1 and jobs == [(batches[0][0], 2 * CLIPS)]
    report = json.loads((output / "batch_report.json").read_text())
    assert sorted(row["state"] for row in report["pairs"]) == ["succeeded"] * 2 * CLIPS
    assert (output / "batch_throughput.png").read_bytes().startswith(b"\x89PNG")


def test_a_single_job_submitted_while_a_batch_runs_finishes_before_it(client: JobClient, clips: list[Path]) -> None:
    source = sample_media.encode_png(sample_media.grace_hopper_photo())
    spec = jobs_pb2.BatchSpec(
        targets=[jobs_pb2.BatchTarget(filename=clip.name, size_bytes=clip.stat().st_size) for clip in clips],
        sources=[jobs_pb2.BatchSource(name=face, image=source) for face in SOURCES],
    )
    batch = client.submit_batch(spec, list(clips))
    for event in client.watch_batch(batch.id):
        if event.counts.succeeded >= 1:
            break
    single = wait_for_job(client, client.submit(source, target_path=clips[-1]).id)
    assert single.state == jobs_pb2.JOB_STATE_SUCCEEDED
    for event in client.watch_batch(batch.id):
        if event.state != jobs_pb2.BATCH_STATE_RUNNING:
            break
    finished = client.get_batch(batch.id)
    assert finished.state == jobs_pb2.BATCH_STATE_SUCCEEDED and finished.counts.succeeded == 2 * CLIPS
    assert single.finished_at.ToNanoseconds() < finished.finished_at.ToNanoseconds()
    jobs = list(client.jobs(batch_id=batch.id))
    # It went ahead of the batch's queued jobs: several of them started only after it had ended (first in,
    # first out, none would have).
    assert sum(job.started_at.ToNanoseconds() > single.finished_at.ToNanoseconds() for job in jobs) >= 3

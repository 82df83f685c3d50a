"""`make bench`'s batch line: a batch of short clips times two faces through the embedded stack, measured as
jobs a minute and frames a second from the submission to the last job's end; and a single job's time on the
idle stack against its time when submitted while the batch runs (interactive jobs go first)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from services.cli import sample_media
from services.cli.embedded_stack import EmbeddedStack, StackOptions
from services.cli.job_client import JobClient
from swapline.jobs.v1 import jobs_pb2

BATCH_CLIPS = 6
BATCH_CLIP_SECONDS = 1.0
BATCH_CLIP_SIZE = (640, 360)


@dataclass(frozen=True)
class BatchFigures:
    jobs: int
    frames: int
    wall_seconds: float
    jobs_per_minute: float
    fps: float
    # One clip's job alone on the idle stack, and submitted once the batch's first job has ended.
    single_idle_seconds: float
    single_during_batch_seconds: float


def make_clips(folder: Path, count: int = BATCH_CLIPS) -> list[Path]:
    """Short clips of the package-shipped astronaut photo, made once and kept in the bench's work folder."""
    clips = []
    for index in range(count):
        clip = folder / f"clip-{index}.mp4"
        if not clip.exists():
            sample_media.make_face_video(
                clip, sample_media.astronaut_photo(), seconds=BATCH_CLIP_SECONDS, size=BATCH_CLIP_SIZE
            )
        clips.append(clip)
    return clips


def timed_job(client: JobClient, source: bytes, clip: Path) -> float:
    started = time.perf_counter()
    job = wait_for_job(client, client.submit(source, target_path=clip).id)
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"the benchmark's single job ended {jobs_pb2.JobState.Name(job.state)}")
    return time.perf_counter() - started


def run_batch(client: JobClient, clips: list[Path], single_idle_seconds: float) -> BatchFigures:
    """Submits every clip with two faces (Grace Hopper's and the astronaut's), times a single job submitted once
    the batch's first job has ended, and waits for the batch's end."""
    sources = [
        jobs_pb2.BatchSource(name=name, image=sample_media.encode_png(photo))
        for name, photo in (
            ("hopper", sample_media.grace_hopper_photo()),
            ("astronaut", sample_media.astronaut_photo()),
        )
    ]
    spec = jobs_pb2.BatchSpec(
        targets=[jobs_pb2.BatchTarget(filename=clip.name, size_bytes=clip.stat().st_size) for clip in clips],
        sources=sources,
        name="bench",
    )
    started = time.perf_counter()
    batch = client.submit_batch(spec, list(clips))
    for event in client.watch_batch(batch.id):
        if event.counts.succeeded >= 1 or event.state != jobs_pb2.BATCH_STATE_RUNNING:
            break
    single_seconds = timed_job(client, sources[0].image, clips[-1])
    for event in client.watch_batch(batch.id):
        if event.state != jobs_pb2.BATCH_STATE_RUNNING:
            break
    wall = time.perf_counter() - started
    finished = client.get_batch(batch.id)
    if finished.state != jobs_pb2.BATCH_STATE_SUCCEEDED:
        raise SystemExit(f"the benchmark batch ended {jobs_pb2.BatchState.Name(finished.state)}")
    jobs = finished.counts.jobs_total
    return BatchFigures(
        jobs,
        finished.frames_done,
        wall,
        60.0 * jobs / wall,
        finished.frames_done / wall,
        single_idle_seconds,
        single_seconds,
    )


def batch_line(work_dir: Path, workers: int) -> BatchFigures:
    """The batch on a stack of its own, after a warm-up job, so model loading is not counted."""
    clips = make_clips(work_dir / "batch-clips")
    stack_dir = work_dir / f"batch-stack-{workers}"
    options = StackOptions(work_dir=stack_dir, media_root=stack_dir / "media", workers=workers)
    with EmbeddedStack(options) as stack, JobClient(stack.gateway_address) as client:
        source = sample_media.encode_png(sample_media.grace_hopper_photo())
        timed_job(client, source, clips[0])
        return run_batch(client, clips, timed_job(client, source, clips[-1]))


def wait_for_job(client: JobClient, job_id: str) -> jobs_pb2.Job:
    for event in client.watch(job_id):
        if event.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
            break
    return client.get(job_id)


def describe_batch(batch: BatchFigures, workers: int) -> str:
    return (
        f"batch of {batch.jobs} jobs ({BATCH_CLIPS} clips of {BATCH_CLIP_SECONDS:g} s at {BATCH_CLIP_SIZE[0]}x"
        f"{BATCH_CLIP_SIZE[1]} times 2 faces, {workers} workers): {batch.jobs_per_minute:.1f} jobs a minute,"
        f" {batch.fps:.1f} fps ({batch.frames} frames in {batch.wall_seconds:.1f} s, submission to the last job's"
        f" end)\na single job submitted while the batch ran: {batch.single_during_batch_seconds:.1f} s against"
        f" {batch.single_idle_seconds:.1f} s on the idle stack"
        f" ({batch.single_during_batch_seconds / batch.single_idle_seconds:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.batch_bench", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    print(describe_batch(batch_line(args.workdir.resolve(), args.workers), args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

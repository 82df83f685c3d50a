"""A batch's state and progress, derived from its record and its jobs as stored: nothing of it is stored twice."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.gateway.job_records import ENDED_JOB_STATES, BatchRecord, JobRecord, JobState

BatchState = Literal["RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
BATCH_STATES: tuple[BatchState, ...] = typing.get_args(BatchState)


@dataclass(frozen=True)
class BatchCounts:
    """The batch's jobs by state; skipped pairs have no job. A job retention deleted counts in none."""

    jobs_total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    skipped: int


@dataclass(frozen=True)
class BatchProgress:
    batch: BatchRecord
    # The batch's jobs still stored, by id.
    jobs: dict[str, JobRecord]
    state: BatchState
    counts: BatchCounts
    frames_done: int
    frames_total: int
    fps: float
    # Negative while unknown.
    eta_seconds: float
    # When the first job started and the last one ended; None before and while running.
    started_at: float | None
    finished_at: float | None
    at: float


def batch_counts(batch: BatchRecord, jobs: Sequence[JobRecord]) -> BatchCounts:
    states = [job.state for job in jobs]

    def count(*wanted: JobState) -> int:
        return sum(state in wanted for state in states)

    return BatchCounts(
        jobs_total=len(batch.job_ids),
        queued=count("QUEUED"),
        running=count("RUNNING", "JOINING"),
        succeeded=count("SUCCEEDED"),
        failed=count("FAILED"),
        cancelled=count("CANCELLED"),
        skipped=len(batch.entries) - len(batch.job_ids),
    )


def batch_state(batch: BatchRecord, jobs: Sequence[JobRecord]) -> BatchState:
    """RUNNING until every job has ended; then CANCELLED if the batch was cancelled, FAILED if a job failed,
    CANCELLED if one was cancelled on its own, else SUCCEEDED."""
    states = {job.state for job in jobs}
    if not states <= ENDED_JOB_STATES:
        return "RUNNING"
    if batch.cancelled_at is not None:
        return "CANCELLED"
    if "FAILED" in states:
        return "FAILED"
    if "CANCELLED" in states:
        return "CANCELLED"
    return "SUCCEEDED"


def batch_progress(batch: BatchRecord, jobs: Sequence[JobRecord], now: float) -> BatchProgress:
    """fps counts from the first job's start to now (or the last job's end), so queueing between the batch's
    jobs counts against it, as a person waiting for the batch sees it."""
    state = batch_state(batch, jobs)
    frames_done = sum(job.frames_done for job in jobs)
    frames_total = sum(job.frames_total for job in jobs)
    starts = [job.started_at for job in jobs if job.started_at is not None]
    started_at = min(starts) if starts else None
    ends = [job.finished_at for job in jobs if job.finished_at is not None]
    finished_at = max(ends, default=batch.created_at) if state != "RUNNING" else None
    fps, eta = 0.0, -1.0
    if started_at is not None:
        elapsed = (finished_at if finished_at is not None else now) - started_at
        fps = frames_done / elapsed if elapsed > 0 else 0.0
        if state != "RUNNING":
            eta = 0.0
        elif fps > 0:
            eta = max(frames_total - frames_done, 0) / fps
    elif state != "RUNNING":
        eta = 0.0
    return BatchProgress(
        batch=batch,
        jobs={job.id: job for job in jobs},
        state=state,
        counts=batch_counts(batch, jobs),
        frames_done=frames_done,
        frames_total=frames_total,
        fps=fps,
        eta_seconds=eta,
        started_at=started_at,
        finished_at=finished_at,
        at=now,
    )

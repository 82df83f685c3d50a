"""Hands chunks to workers under leases that lapse without heartbeats, and takes back their results."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from services.common.errors import FailedPrecondition, code_value
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_records import (
    LIVE_JOB_STATES,
    ChunkRecord,
    ChunkStats,
    JobError,
    JobRecord,
)

log = logging.getLogger(__name__)

CHUNK_LEASES = Counter("swapline_gateway_chunk_leases_total", "Chunk leases handed to workers.")
CHUNKS_COMPLETED = Counter("swapline_gateway_chunks_completed_total", "Chunks completed by workers.")
CHUNK_FAILURES = Counter(
    "swapline_gateway_chunk_failures_total",
    "Chunk attempts that did not complete, by cause: lapsed (no heartbeat), retryable or fatal error.",
    ["cause"],
)
FRAMES_PROCESSED = Counter("swapline_gateway_frames_processed_total", "Frames in completed chunks.")

# A worker asking for more than this waits this long; it asks again anyway.
MAX_LEASE_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class ChunkLease:
    lease_id: str
    chunk: ChunkRecord
    job: JobRecord
    lease_seconds: float


@dataclass(frozen=True)
class HeartbeatAnswer:
    stop: bool
    reason: str = ""


def _end_reason(job: JobRecord | None, job_id: str) -> str:
    if job is None:
        return f"job {job_id} no longer exists"
    if job.state == "CANCELLED":
        return f"job {job_id} was cancelled"
    if job.state == "FAILED":
        return f"job {job_id} failed: {job.error.message if job.error else 'unknown reason'}"
    return f"job {job_id} is {job.state}; this chunk is no longer needed"


class ChunkQueue:
    def __init__(self, coordinator: JobCoordinator, lease_seconds: float, max_attempts: int) -> None:
        self._coordinator = coordinator
        self._store = coordinator.store
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self._work = asyncio.Condition()

    async def work_added(self) -> None:
        """Wakes workers waiting in lease(); called whenever a chunk becomes PENDING."""
        async with self._work:
            self._work.notify_all()

    def _try_lease(self, worker_id: str) -> ChunkLease | None:
        now = self._coordinator.now()
        lease_id = uuid.uuid4().hex
        chunk = self._store.lease_next_chunk(worker_id, lease_id, now, now + self.lease_seconds)
        if chunk is None:
            return None
        CHUNK_LEASES.inc()
        job = self._coordinator.require_job(chunk.job_id)
        return ChunkLease(lease_id=lease_id, chunk=chunk, job=job, lease_seconds=self.lease_seconds)

    async def lease(self, worker_id: str, wait_seconds: float) -> ChunkLease | None:
        """The oldest live job's next PENDING chunk, waiting up to wait_seconds for one to appear."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait_seconds, 0.0), MAX_LEASE_WAIT_SECONDS)
        async with self._work:
            # No await between looking and waiting, so a chunk added meanwhile always wakes this waiter.
            while (lease := self._try_lease(worker_id)) is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._work.wait(), remaining)
                except TimeoutError:
                    return None
        await self._coordinator.changed(lease.chunk.job_id)
        return lease

    async def heartbeat(self, lease_id: str, frames_done: int, stage: str, faces: int) -> HeartbeatAnswer:
        chunk = self._store.chunk_for_lease(lease_id)
        if chunk is None:
            return HeartbeatAnswer(True, f"lease {lease_id} is unknown or has lapsed")
        job = self._store.get_job(chunk.job_id)
        if job is None or job.state not in LIVE_JOB_STATES or chunk.state != "LEASED":
            return HeartbeatAnswer(True, _end_reason(job, chunk.job_id))
        now = self._coordinator.now()
        if chunk.lease_expires_at < now:
            await self._lapse(chunk)
            return HeartbeatAnswer(True, f"lease {lease_id} lapsed before this heartbeat")
        self._store.record_progress(lease_id, now + self.lease_seconds, frames_done, stage, faces)
        await self._coordinator.feed.notify(chunk.job_id)
        return HeartbeatAnswer(False)

    def _held_chunk(self, lease_id: str) -> ChunkRecord:
        chunk = self._store.chunk_for_lease(lease_id)
        if chunk is None:
            raise FailedPrecondition(
                f"lease {lease_id} is unknown or has lapsed; the chunk went to another worker"
            )
        return chunk

    async def complete(self, lease_id: str, segment_uri: str, stats: ChunkStats) -> None:
        """A lapsed but not yet re-queued lease still completes: the segment is there."""
        chunk = self._held_chunk(lease_id)
        if chunk.state != "LEASED":
            raise FailedPrecondition(_end_reason(self._store.get_job(chunk.job_id), chunk.job_id))
        all_done = self._store.finish_chunk(
            chunk.job_id, chunk.index, segment_uri or chunk.segment_uri, stats
        )
        CHUNKS_COMPLETED.inc()
        FRAMES_PROCESSED.inc(stats.frames)
        await self._coordinator.changed(chunk.job_id)
        if all_done:
            await self._coordinator.chunks_finished(chunk.job_id)

    async def fail(self, lease_id: str, error: JobError, retryable: bool) -> None:
        chunk = self._held_chunk(lease_id)
        if chunk.state == "LEASED":
            CHUNK_FAILURES.labels("retryable" if retryable else "fatal").inc()
            await self._give_back(chunk, error, retryable)

    async def _lapse(self, chunk: ChunkRecord) -> None:
        reason = (
            f"lease lapsed: no heartbeat from worker {chunk.worker_id or '?'} within {self.lease_seconds:g} s"
        )
        CHUNK_FAILURES.labels("lapsed").inc()
        await self._give_back(chunk, JobError(code_value(grpc.StatusCode.DEADLINE_EXCEEDED), reason), True)

    async def _give_back(self, chunk: ChunkRecord, error: JobError, retryable: bool) -> None:
        if retryable and chunk.attempts < self.max_attempts:
            self._store.release_chunk(chunk.job_id, chunk.index, error, retry=True)
            await self._coordinator.changed(chunk.job_id)
            await self.work_added()
            return
        self._store.release_chunk(chunk.job_id, chunk.index, error, retry=False)
        message = (
            f"chunk {chunk.index} failed after {chunk.attempts} attempts: {error.message}"
            if retryable
            else f"chunk {chunk.index} failed: {error.message}"
        )
        await self._coordinator.fail_job(chunk.job_id, JobError(error.code, message))

    async def reap_lapsed(self) -> int:
        """Re-queues (or fails, past the attempt limit) every chunk whose lease has lapsed."""
        lapsed = self._store.lapsed_leases(self._coordinator.now())
        for chunk in lapsed:
            await self._lapse(chunk)
        return len(lapsed)

    async def reap_forever(self) -> None:
        interval = max(0.2, min(5.0, self.lease_seconds / 3))
        while True:
            try:
                await self.reap_lapsed()
            except Exception:
                log.exception("reaping lapsed leases failed")
            await asyncio.sleep(interval)

"""Hands chunks to workers under leases that lapse without heartbeats, and takes back their results.

Every store call runs on the store's own thread (`store.run`), so a query waiting in the database never
holds up the event loop.

A failed attempt (or a lapsed lease) goes back to the queue after an exponential backoff, for as long as
the retry budget lasts, counted from the first failure of the current run of failures: an outage of a
stage service is waited out instead of spending every attempt while the channels reconnect. A job whose
leased chunks make no progress for the stall deadline fails with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from services.common.errors import FailedPrecondition, InvalidArgument, SwaplineError, code_value
from services.common.input_limits import excerpt
from services.gateway.chunk_planner import attempt_segment_uri
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_images import read_media_file
from services.gateway.job_records import (
    LIVE_JOB_STATES,
    ChunkRecord,
    ChunkStats,
    JobError,
    JobRecord,
    RetrySchedule,
)
from services.gateway.retry_policy import RetryPolicy
from services.gateway.tenant_chunk_limits import NO_TENANT_CHUNK_LIMITS, TenantChunkLimits

log = logging.getLogger(__name__)

CHUNK_LEASES = Counter("swapline_gateway_chunk_leases_total", "Chunk leases handed to workers.")
CHUNKS_COMPLETED = Counter("swapline_gateway_chunks_completed_total", "Chunks completed by workers.")
CHUNK_FAILURES = Counter(
    "swapline_gateway_chunk_failures_total",
    "Chunk attempts that did not complete, by cause: lapsed (no heartbeat), retryable or fatal error, "
    "frames (a completion whose frame count was not the chunk's).",
    ["cause"],
)
FRAMES_PROCESSED = Counter("swapline_gateway_frames_processed_total", "Frames in completed chunks.")
JOBS_STALLED = Counter(
    "swapline_gateway_jobs_stalled_total", "Jobs failed because their chunks made no progress within the deadline."
)

# A worker asking for more than this waits this long; it asks again anyway.
MAX_LEASE_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class ChunkLease:
    lease_id: str
    chunk: ChunkRecord
    job: JobRecord
    lease_seconds: float
    # This lease's own segment name: a stale worker of an earlier lease never writes it.
    segment_uri: str
    # Read from media storage for the lease; the job record holds only their URIs.
    source_image: bytes
    reference_image: bytes


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
    def __init__(
        self,
        coordinator: JobCoordinator,
        lease_seconds: float,
        retry: RetryPolicy,
        stall_deadline_seconds: float = 0.0,
        tenant_limits: TenantChunkLimits = NO_TENANT_CHUNK_LIMITS,
    ) -> None:
        """stall_deadline_seconds: 0 turns the stall deadline off. tenant_limits: the chunks each tenant may hold
        leased at once."""
        self._coordinator = coordinator
        self._store = coordinator.store
        self.lease_seconds = lease_seconds
        self.retry = retry
        self.stall_deadline_seconds = stall_deadline_seconds
        self.tenant_limits = tenant_limits
        self._work = asyncio.Condition()
        # Counts work_added calls: a waiter that saw it change while it looked in the store looks again.
        self._work_generation = 0

    async def work_added(self) -> None:
        """Wakes workers waiting in lease(); called whenever a chunk becomes PENDING, through this gateway or
        (heard through the store's change feed) another one."""
        async with self._work:
            self._work_generation += 1
            self._work.notify_all()

    def _work_added_since(self, generation: int) -> bool:
        return self._work_generation != generation

    async def _lease_ended(self) -> None:
        """A lease ended through this gateway (its chunk finished, or its job ended): its tenant may lease again,
        so the leases a tenant limit held back look again. Other gateways hear it through the store."""
        if self.tenant_limits.has_limits:
            await self.work_added()

    def _lease_or_next_due(self, worker_id: str) -> tuple[ChunkRecord | None, float | None]:
        """On the store's thread: a leased chunk; else when the next chunk backing off becomes due (None: none)."""
        now = self._coordinator.now()
        chunk = self._store.lease_next_chunk(
            worker_id, uuid.uuid4().hex, now, now + self.lease_seconds, self.tenant_limits
        )
        if chunk is not None:
            CHUNK_LEASES.inc()
            return chunk, None
        due = self._store.next_due_at(now)
        return None, None if due is None else due - now

    async def lease(self, worker_id: str, wait_seconds: float) -> ChunkLease | None:
        """The next due PENDING chunk in the store's order (interactive jobs first, then the tenant holding the
        fewest leases, then the oldest job) of a tenant under its limit, waiting up to wait_seconds for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait_seconds, 0.0), MAX_LEASE_WAIT_SECONDS)
        while True:
            chunk = await self._next_chunk(worker_id, deadline)
            if chunk is None:
                return None
            lease = await self._with_inputs(chunk)
            if lease is not None:
                await self._coordinator.changed(chunk.job_id)
                return lease

    async def _next_chunk(self, worker_id: str, deadline: float) -> ChunkRecord | None:
        loop = asyncio.get_running_loop()
        while True:
            looked_at = self._work_generation
            chunk, due_in = await self._store.run(self._lease_or_next_due, worker_id)
            if chunk is not None:
                return chunk
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            # A chunk added while the store was asked has changed the generation: no wait then.
            async with self._work:
                # A timeout means a chunk came due or the wait is over: look again either way.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._work.wait_for(functools.partial(self._work_added_since, looked_at)),
                        remaining if due_in is None else min(remaining, due_in),
                    )

    async def _with_inputs(self, chunk: ChunkRecord) -> ChunkLease | None:
        """The lease with the job's images; None (the chunk given back) when they cannot be read."""
        job = await self._coordinator.load_job(chunk.job_id)
        media_root = self._coordinator.media_root
        try:
            source = await asyncio.to_thread(read_media_file, media_root, job.source_image_uri)
            reference = await asyncio.to_thread(read_media_file, media_root, job.reference_image_uri)
        except SwaplineError as error:
            # Missing or not a file: no later attempt can do better.
            await self._give_back(chunk, JobError(code_value(error.code), f"the job's images: {error.message}"), False)
            return None
        except OSError as error:
            log.warning("reading the images of job %s failed: %s", job.id, error)
            reason = f"media storage could not be read ({error.strerror or type(error).__name__})"
            await self._give_back(chunk, JobError(code_value(grpc.StatusCode.UNAVAILABLE), reason), True)
            return None
        return ChunkLease(
            lease_id=chunk.lease_id,
            chunk=chunk,
            job=job,
            lease_seconds=self.lease_seconds,
            segment_uri=attempt_segment_uri(chunk.segment_uri, chunk.attempts),
            source_image=source,
            reference_image=reference,
        )

    def _leased_chunk_and_job(self, lease_id: str) -> tuple[ChunkRecord | None, JobRecord | None]:
        """On the store's thread: the lease's chunk and its job, read together."""
        chunk = self._store.chunk_for_lease(lease_id)
        return chunk, None if chunk is None else self._store.get_job(chunk.job_id)

    async def heartbeat(self, lease_id: str, frames_done: int, stage: str, faces: int) -> HeartbeatAnswer:
        chunk, job = await self._store.run(self._leased_chunk_and_job, lease_id)
        if chunk is None:
            return HeartbeatAnswer(True, f"lease {excerpt(lease_id)} is unknown or has lapsed")
        if job is None or job.state not in LIVE_JOB_STATES or chunk.state != "LEASED":
            return HeartbeatAnswer(True, _end_reason(job, chunk.job_id))
        now = self._coordinator.now()
        if chunk.lease_expires_at < now:
            await self._lapse(chunk)
            return HeartbeatAnswer(True, f"lease {excerpt(lease_id)} lapsed before this heartbeat")
        await self._store.run(
            self._store.record_progress,
            chunk.job_id,
            lease_id,
            now + self.lease_seconds,
            frames_done,
            stage,
            faces,
            now,
        )
        await self._coordinator.feed.notify(chunk.job_id)
        return HeartbeatAnswer(False)

    async def _held_chunk(self, lease_id: str) -> ChunkRecord:
        chunk = await self._store.run(self._store.chunk_for_lease, lease_id)
        if chunk is None:
            raise FailedPrecondition(
                f"lease {excerpt(lease_id)} is unknown or has lapsed; the chunk went to another worker"
            )
        return chunk

    async def complete(self, lease_id: str, segment_uri: str, stats: ChunkStats) -> None:
        """Only the lease that holds the chunk completes it, with its own segment and the chunk's frames.

        A lapsed lease not yet given back still completes: nobody else holds the chunk, the segment is there.
        """
        chunk = await self._held_chunk(lease_id)
        if chunk.state != "LEASED":
            raise FailedPrecondition(
                _end_reason(await self._store.run(self._store.get_job, chunk.job_id), chunk.job_id)
            )
        leased_segment = attempt_segment_uri(chunk.segment_uri, chunk.attempts)
        if segment_uri and segment_uri != leased_segment:
            raise InvalidArgument(f"segment_uri {excerpt(segment_uri)} is not this lease's segment {leased_segment!r}")
        if stats.frames != chunk.frame_count:
            CHUNK_FAILURES.labels("frames").inc()
            reason = f"the segment of chunk {chunk.index} holds {stats.frames} frames, not {chunk.frame_count}"
            await self._give_back(chunk, JobError(code_value(grpc.StatusCode.DATA_LOSS), reason), True)
            raise FailedPrecondition(f"{reason}; the completion is refused")
        remaining = await self._store.run(
            self._store.finish_chunk,
            chunk.job_id,
            chunk.index,
            lease_id,
            leased_segment,
            stats,
            self._coordinator.now(),
        )
        if remaining is None:
            raise FailedPrecondition(
                f"lease {excerpt(lease_id)} no longer holds chunk {chunk.index}; the chunk went to another worker"
            )
        CHUNKS_COMPLETED.inc()
        FRAMES_PROCESSED.inc(stats.frames)
        await self._lease_ended()
        await self._coordinator.changed(chunk.job_id)
        if remaining == 0:
            await self._coordinator.chunks_finished(chunk.job_id)

    async def fail(self, lease_id: str, error: JobError, retryable: bool) -> None:
        chunk = await self._held_chunk(lease_id)
        if chunk.state == "LEASED":
            CHUNK_FAILURES.labels("retryable" if retryable else "fatal").inc()
            await self._give_back(chunk, error, retryable)

    async def _lapse(self, chunk: ChunkRecord) -> None:
        reason = (
            f"lease lapsed: no heartbeat from worker {excerpt(chunk.worker_id or '?')} within {self.lease_seconds:g} s"
        )
        CHUNK_FAILURES.labels("lapsed").inc()
        await self._give_back(chunk, JobError(code_value(grpc.StatusCode.DEADLINE_EXCEEDED), reason), True)

    async def _give_back(self, chunk: ChunkRecord, error: JobError, retryable: bool) -> None:
        """Queues a retryable failure again after its backoff while budget and attempts last; else fails the job."""
        now = self._coordinator.now()
        if retryable:
            failing_since = chunk.failing_since if chunk.failing_since is not None else now
            failures = chunk.failure_streak + 1
            retry_at = self.retry.retry_at(failing_since, failures, chunk.attempts, now)
            if retry_at is not None:
                schedule = RetrySchedule(retry_at, failing_since, failures)
                if await self._store.run(self._store.requeue_chunk, chunk, error, schedule, now):
                    await self._coordinator.changed(chunk.job_id)
                    await self.work_added()
                return
            message = self._spent_message(chunk, error, failing_since, now)
        else:
            message = f"chunk {chunk.index} failed: {error.message}"
        if await self._store.run(self._store.fail_chunk, chunk, error, now):
            await self._coordinator.fail_job(chunk.job_id, JobError(error.code, message))
            await self._lease_ended()

    @staticmethod
    def _spent_message(chunk: ChunkRecord, error: JobError, failing_since: float, now: float) -> str:
        return (
            f"chunk {chunk.index} failed after {chunk.attempts} attempts, failing for "
            f"{now - failing_since:.0f} s: {error.message}"
        )

    async def reap_lapsed(self) -> int:
        """Gives back every chunk whose lease has lapsed: queued again, or failed past the budget."""
        lapsed = await self._store.run(self._store.lapsed_leases, self._coordinator.now())
        for chunk in lapsed:
            await self._lapse(chunk)
        return len(lapsed)

    async def fail_spent_budgets(self) -> int:
        """Fails the jobs of queued chunks whose retry budget ran out while nobody leased them.

        A chunk's last try is due at the budget's end at the latest. Then it waits up to one budget more
        for a worker to take it: during an outage every worker may be waiting it out on another chunk,
        and is only free once the outage is over. Workers that cannot lease at all (Triton gone for good)
        still end the job after twice the budget instead of never.
        """
        now = self._coordinator.now()
        budget = self.retry.budget_seconds
        spent = await self._store.run(self._store.budget_spent_chunks, now - 2 * budget, now - self.lease_seconds)
        for chunk in spent:
            error = chunk.last_error or JobError(code_value(grpc.StatusCode.UNAVAILABLE), "no worker took the chunk")
            failing_since = chunk.failing_since if chunk.failing_since is not None else now
            if await self._store.run(self._store.fail_chunk, chunk, error, now):
                message = self._spent_message(chunk, error, failing_since, now)
                if await self._coordinator.fail_job(chunk.job_id, JobError(error.code, message)):
                    await self._lease_ended()
        return len(spent)

    async def fail_stalled_jobs(self) -> int:
        """Fails RUNNING jobs whose leased chunks made no progress for the stall deadline (if one is set)."""
        if self.stall_deadline_seconds <= 0:
            return 0
        stalled = await self._store.run(self._store.stalled_jobs, self._coordinator.now(), self.stall_deadline_seconds)
        for job in stalled:
            chunk = job.chunk
            where = (
                ""
                if chunk is None
                else f" in chunk {chunk.index} (stage {chunk.stage or 'starting'}, {chunk.frames_done} of "
                f"{chunk.frame_count} frames, worker {excerpt(chunk.worker_id)})"
            )
            reason = (
                f"no progress for {job.stalled_seconds:.0f} s{where}; "
                f"the stall deadline is {self.stall_deadline_seconds:g} s"
            )
            if await self._coordinator.fail_job(
                job.job_id, JobError(code_value(grpc.StatusCode.DEADLINE_EXCEEDED), reason)
            ):
                JOBS_STALLED.inc()
                await self._lease_ended()
        return len(stalled)

    async def reap_once(self) -> None:
        await self.reap_lapsed()
        await self.fail_spent_budgets()
        await self.fail_stalled_jobs()

    async def reap_forever(self) -> None:
        interval = max(0.2, min(5.0, self.lease_seconds / 3))
        while True:
            try:
                await self.reap_once()
            except Exception:
                log.exception("reaping lapsed leases, spent retry budgets or stalled jobs failed")
            await asyncio.sleep(interval)

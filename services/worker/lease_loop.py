"""Leases chunks from the gateway, runs them with heartbeats, and reports each one's end.

Every ended chunk is reported exactly once: CompleteChunk with its stats, or FailChunk with the
error's status code, retryable when trying again may pass (services.common.errors.RETRYABLE_CODES).
A heartbeat answered with stop (job cancelled, lease lapsed) cancels the chunk and reports
nothing: the lease is no longer this worker's. On shutdown (the loop's task is cancelled) no new
chunk is leased; each chunk in hand gets `drain_seconds` to finish and is otherwise failed as
retryable, so another worker takes it at once instead of after the lease lapses.

A slot leases its next chunk once the current one has sent its last frame to the encoder, so the
encoder's flush of one segment overlaps the next chunk's decode and detection instead of leaving
the worker idle; a slot then holds two chunks, one computing and one finishing.

No chunk is leased while the models are not ready (Triton down or restarting): a chunk leased then
could only fail. The loop polls readiness with backoff up to `ready_poll_max_seconds`, so it leases
again soon after Triton is back, and logs once when the models stop being ready and once when they
are ready again, not on every poll.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.errors import RETRYABLE_CODES, SwaplineError, code_value, from_rpc_error
from services.worker.chunk_pipeline import ChunkStats
from services.worker.chunk_runner import chunk_stats_to_proto
from services.worker.worker_metrics import record_chunk_outcome, record_completed_chunk
from swapline.chunks.v1 import chunks_pb2, chunks_pb2_grpc
from swapline.common.v1 import common_pb2

log = logging.getLogger(__name__)

ChunkRun = Callable[[chunks_pb2.ChunkLease, ChunkStats], Coroutine[Any, Any, ChunkStats]]
ReadyCheck = Callable[[], Awaitable[bool]]

# Extra time a LeaseChunk call gets beyond the wait it asks the gateway for.
LEASE_CALL_MARGIN_SECONDS = 10.0
REPORT_TIMEOUT_SECONDS = 10.0
REPORT_ATTEMPTS = 5


@dataclass(frozen=True)
class LeaseLoopSettings:
    worker_id: str
    lease_wait_seconds: float = 10.0
    heartbeat_seconds: float = 5.0
    drain_seconds: float = 10.0
    concurrency: int = 1
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    # Readiness is a cheap call: polled at most this far apart while the models are away.
    ready_poll_max_seconds: float = 2.0


class Backoff:
    """Exponential backoff with full jitter: many workers losing the gateway at once do not return in step."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * (2.0**self._failures))
        self._failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._failures = 0


def failure_status(error: BaseException) -> tuple[common_pb2.ErrorStatus, bool]:
    """The ErrorStatus a failed chunk is reported with, and whether trying again may pass."""
    if isinstance(error, grpc.aio.AioRpcError):
        error = from_rpc_error(error)
    if isinstance(error, SwaplineError):
        code, message = error.code, error.message
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
    return common_pb2.ErrorStatus(code=code_value(code), message=message), code in RETRYABLE_CODES


async def _until_frames_sent(handled: asyncio.Task[None], stats: ChunkStats) -> None:
    """Returns when the chunk has handed its last frame to the encoder or has ended; raises what it raised."""
    sent = asyncio.create_task(stats.frames_sent.wait())
    try:
        await asyncio.wait({handled, sent}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sent.cancel()
    if handled.done():
        handled.result()


class LeaseLoop:
    def __init__(
        self,
        queue: chunks_pb2_grpc.ChunkQueueServiceStub,
        run_chunk: ChunkRun,
        settings: LeaseLoopSettings,
        ready: ReadyCheck | None = None,
    ) -> None:
        self._queue = queue
        self._run_chunk = run_chunk
        self._settings = settings
        self._ready = ready
        # Shared by the slots, so a change of readiness is logged once per worker, not once per slot.
        self._models_ready = True

    async def run(self) -> None:
        """Runs `concurrency` lease slots until cancelled."""
        count = self._settings.concurrency
        slots = [asyncio.create_task(self._slot(), name=f"lease-slot-{n}") for n in range(count)]
        try:
            await asyncio.gather(*slots)
        except asyncio.CancelledError:
            # gather has passed the cancellation on to every slot; each one drains its chunk, and
            # cancelling them again would cut that short.
            await asyncio.wait(slots)
            raise
        except Exception:
            for slot in slots:
                slot.cancel()
            await asyncio.wait(slots)
            raise

    async def _slot(self) -> None:
        """Leases the next chunk as soon as the current one has sent its last frame.

        The chunk before then finishes (the encoder flushes its segment, the worker reports) beside
        the next one's decode and detection, so a slot holds at most one chunk in each phase.
        """
        backoff = Backoff(self._settings.backoff_initial_seconds, self._settings.backoff_max_seconds)
        finishing: asyncio.Task[None] | None = None
        handled: asyncio.Task[None] | None = None
        try:
            while True:
                await self._until_models_ready()
                lease = await self._lease(backoff)
                if lease is None:
                    continue
                stats = ChunkStats()
                handled = asyncio.create_task(self.handle_lease(lease, stats), name=f"lease-{lease.lease_id}")
                await _until_frames_sent(handled, stats)
                if finishing is not None:
                    # wait() leaves the task alone if this slot is cancelled meanwhile: it drains below.
                    await asyncio.wait({finishing})
                    finishing.result()
                finishing = None if handled.done() else handled
                handled = None
        except asyncio.CancelledError:
            # Each chunk still in hand drains (or is given back) on its own cancellation.
            live = [task for task in (finishing, handled) if task is not None and not task.done()]
            for task in live:
                task.cancel()
            if live:
                await asyncio.wait(live)
            raise

    async def _until_models_ready(self) -> None:
        if self._ready is None:
            return
        backoff = Backoff(self._settings.backoff_initial_seconds, self._settings.ready_poll_max_seconds)
        while not await self._ready():
            if self._models_ready:
                self._models_ready = False
                log.warning("models are not ready; no chunk is leased until they are")
            await asyncio.sleep(backoff.next_delay())
        if not self._models_ready:
            self._models_ready = True
            log.info("models are ready again; leasing chunks")

    async def _lease(self, backoff: Backoff) -> chunks_pb2.ChunkLease | None:
        request = chunks_pb2.LeaseChunkRequest(
            worker_id=self._settings.worker_id, wait_seconds=self._settings.lease_wait_seconds
        )
        try:
            response = await self._queue.LeaseChunk(
                request, timeout=self._settings.lease_wait_seconds + LEASE_CALL_MARGIN_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            delay = backoff.next_delay()
            log.warning("leasing failed (%s: %s); retrying in %.1fs", error.code().name, error.details(), delay)
            await asyncio.sleep(delay)
            return None
        backoff.reset()
        return response.lease if response.has_lease else None

    async def handle_lease(self, lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> None:
        """Runs one leased chunk to its end and reports it; `stats` fills in as it runs."""
        log.info("chunk %d of job %s leased (attempt %d)", lease.chunk_index, lease.job_id, lease.attempt)
        chunk = asyncio.create_task(self._run_chunk(lease, stats), name=f"chunk-{lease.lease_id}")
        stop_reasons: list[str] = []
        heartbeat = asyncio.create_task(self._heartbeat(lease, stats, chunk, stop_reasons))
        try:
            await asyncio.wait({chunk})
        except asyncio.CancelledError:
            await self._drain(lease, chunk)
            raise
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        await self._report(lease, chunk, stop_reasons)

    async def _drain(self, lease: chunks_pb2.ChunkLease, chunk: asyncio.Task[ChunkStats]) -> None:
        done, _ = await asyncio.wait({chunk}, timeout=self._settings.drain_seconds)
        if done:
            await self._report(lease, chunk, [])
            return
        chunk.cancel()
        await asyncio.gather(chunk, return_exceptions=True)
        record_chunk_outcome("abandoned")
        log.warning("chunk %d of job %s given back: the worker is shutting down", lease.chunk_index, lease.job_id)
        error = common_pb2.ErrorStatus(
            code=code_value(grpc.StatusCode.UNAVAILABLE),
            message="the worker shut down before the chunk finished",
        )
        await self._send_report(
            "FailChunk", chunks_pb2.FailChunkRequest(lease_id=lease.lease_id, error=error, retryable=True)
        )

    async def _report(
        self, lease: chunks_pb2.ChunkLease, chunk: asyncio.Task[ChunkStats], stop_reasons: list[str]
    ) -> None:
        if chunk.cancelled():
            record_chunk_outcome("stopped")
            log.info("chunk %d of job %s stopped: %s", lease.chunk_index, lease.job_id, "; ".join(stop_reasons))
            return
        error = chunk.exception()
        if error is None:
            stats = chunk.result()
            record_completed_chunk(stats)
            log.info(
                "chunk %d of job %s done: %d frames, %d faces",
                lease.chunk_index,
                lease.job_id,
                stats.frames,
                stats.faces,
            )
            await self._send_report(
                "CompleteChunk",
                chunks_pb2.CompleteChunkRequest(
                    lease_id=lease.lease_id, segment_uri=lease.segment_uri, stats=chunk_stats_to_proto(stats)
                ),
            )
            return
        status, retryable = failure_status(error)
        record_chunk_outcome("failed")
        log.warning(
            "chunk %d of job %s failed (code %d, retryable %s): %s",
            lease.chunk_index,
            lease.job_id,
            status.code,
            retryable,
            status.message,
            exc_info=not isinstance(error, SwaplineError),
        )
        await self._send_report(
            "FailChunk",
            chunks_pb2.FailChunkRequest(lease_id=lease.lease_id, error=status, retryable=retryable),
        )

    async def _send_report(
        self, method: str, request: chunks_pb2.CompleteChunkRequest | chunks_pb2.FailChunkRequest
    ) -> None:
        """Retries while the gateway is unreachable; if it stays away, the lease lapses and is re-leased."""
        backoff = Backoff(self._settings.backoff_initial_seconds, self._settings.backoff_max_seconds)
        call = getattr(self._queue, method)
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            try:
                await call(request, timeout=REPORT_TIMEOUT_SECONDS)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE_CODES or attempt == REPORT_ATTEMPTS:
                    log.error("%s for lease %s failed: %s", method, request.lease_id, error.details())
                    return
                await asyncio.sleep(backoff.next_delay())

    async def _heartbeat(
        self,
        lease: chunks_pb2.ChunkLease,
        stats: ChunkStats,
        chunk: asyncio.Task[ChunkStats],
        stop_reasons: list[str],
    ) -> None:
        while not chunk.done():
            await asyncio.sleep(self._settings.heartbeat_seconds)
            request = chunks_pb2.HeartbeatRequest(
                lease_id=lease.lease_id,
                frames_done=stats.frames,
                stage=stats.busiest_stage(),
                faces=stats.faces,
            )
            try:
                response = await self._queue.Heartbeat(request, timeout=max(self._settings.heartbeat_seconds, 1.0))
            except grpc.aio.AioRpcError as error:
                log.warning("heartbeat for lease %s failed: %s", lease.lease_id, error.details())
                continue
            if response.stop:
                stop_reasons.append(response.reason or "the gateway asked the worker to stop")
                chunk.cancel()
                return

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from services.common.errors import InvalidArgument, Unavailable, code_value
from services.worker.chunk_pipeline import ChunkStats
from services.worker.lease_loop import Backoff, LeaseLoop, LeaseLoopSettings, failure_status
from swapline.chunks.v1 import chunks_pb2

LEASE = chunks_pb2.ChunkLease(lease_id="lease-1", job_id="job-1", chunk_index=3, segment_uri="seg/3.mp4")


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="gateway down")


class _FakeQueue:
    """ChunkQueueService as the loop sees it: records every request."""

    def __init__(self, leases: list[chunks_pb2.LeaseChunkResponse | grpc.aio.AioRpcError], stop: bool = False) -> None:
        self._leases = leases
        self._stop = stop
        self.lease_calls = 0
        self.heartbeats: list[chunks_pb2.HeartbeatRequest] = []
        self.completed: list[chunks_pb2.CompleteChunkRequest] = []
        self.failed: list[chunks_pb2.FailChunkRequest] = []
        self.leases_exhausted = asyncio.Event()

    async def LeaseChunk(self, request: chunks_pb2.LeaseChunkRequest, timeout: float) -> Any:
        self.lease_calls += 1
        if not self._leases:
            self.leases_exhausted.set()
            await asyncio.Event().wait()
        answer = self._leases.pop(0)
        if isinstance(answer, grpc.aio.AioRpcError):
            raise answer
        return answer

    async def Heartbeat(self, request: chunks_pb2.HeartbeatRequest, timeout: float) -> Any:
        self.heartbeats.append(request)
        return chunks_pb2.HeartbeatResponse(stop=self._stop, reason="job cancelled" if self._stop else "")

    async def CompleteChunk(self, request: chunks_pb2.CompleteChunkRequest, timeout: float) -> Any:
        self.completed.append(request)
        return chunks_pb2.CompleteChunkResponse()

    async def FailChunk(self, request: chunks_pb2.FailChunkRequest, timeout: float) -> Any:
        self.failed.append(request)
        return chunks_pb2.FailChunkResponse()


def _settings() -> LeaseLoopSettings:
    return LeaseLoopSettings(
        worker_id="w",
        heartbeat_seconds=0.01,
        drain_seconds=0.05,
        backoff_initial_seconds=0.001,
        backoff_max_seconds=0.002,
    )


def _run_until_leases_are_used(queue: _FakeQueue, run_chunk: Any) -> None:
    async def scenario() -> None:
        loop = LeaseLoop(queue, run_chunk, _settings())
        task = asyncio.create_task(loop.run())
        await asyncio.wait_for(queue.leases_exhausted.wait(), timeout=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


async def _shut_down_when(
    event: asyncio.Event, queue: _FakeQueue, run_chunk: Any, settings: LeaseLoopSettings | None = None
) -> None:
    """Runs the loop until `event` is set, then shuts it down as SIGTERM does and waits for its drain."""
    task = asyncio.create_task(LeaseLoop(queue, run_chunk, settings or _settings()).run())
    await asyncio.wait_for(event.wait(), timeout=10)
    task.cancel()
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout=10)


def _leased() -> chunks_pb2.LeaseChunkResponse:
    return chunks_pb2.LeaseChunkResponse(has_lease=True, lease=LEASE)


def test_a_finished_chunk_is_completed_with_its_stats() -> None:
    async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        stats.record_frame(lease.chunk_index * 10, 1)
        return stats

    queue = _FakeQueue([chunks_pb2.LeaseChunkResponse(has_lease=False), _leased()])
    _run_until_leases_are_used(queue, run_chunk)
    assert [request.lease_id for request in queue.completed] == ["lease-1"]
    assert queue.completed[0].segment_uri == "seg/3.mp4"
    assert queue.completed[0].stats.frames == 1 and queue.completed[0].stats.faces == 1
    assert queue.failed == []


@pytest.mark.parametrize(
    ("error", "retryable"),
    [(InvalidArgument("truncated video"), False), (Unavailable("decoder restarting"), True)],
)
def test_a_failed_chunk_is_failed_with_its_code(error: Exception, retryable: bool) -> None:
    async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        raise error

    queue = _FakeQueue([_leased()])
    _run_until_leases_are_used(queue, run_chunk)
    assert queue.completed == []
    assert len(queue.failed) == 1
    assert queue.failed[0].retryable is retryable
    assert queue.failed[0].error.message == str(error)


def test_heartbeats_carry_progress_and_stop_cancels_the_chunk() -> None:
    cancelled = []

    async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        stats.record_frame(0, 2)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return stats

    queue = _FakeQueue([_leased()], stop=True)
    _run_until_leases_are_used(queue, run_chunk)
    assert cancelled == [True]
    assert queue.heartbeats[0].lease_id == "lease-1"
    assert (queue.heartbeats[0].frames_done, queue.heartbeats[0].faces) == (1, 2)
    assert queue.completed == [] and queue.failed == []


def test_an_unreachable_gateway_is_retried_with_backoff() -> None:
    unavailable = _rpc_error(grpc.StatusCode.UNAVAILABLE)

    async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        return stats

    queue = _FakeQueue([unavailable, unavailable, unavailable, _leased()])
    _run_until_leases_are_used(queue, run_chunk)
    assert queue.lease_calls == 5
    assert len(queue.completed) == 1


def test_shutdown_gives_an_unfinished_chunk_back_as_retryable() -> None:
    async def scenario() -> _FakeQueue:
        started = asyncio.Event()

        async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
            started.set()
            await asyncio.Event().wait()
            return stats

        queue = _FakeQueue([_leased()])
        await _shut_down_when(started, queue, run_chunk)
        return queue

    queue = asyncio.run(scenario())
    assert len(queue.failed) == 1 and queue.failed[0].retryable
    assert queue.failed[0].error.code == code_value(grpc.StatusCode.UNAVAILABLE)


def test_shutdown_lets_a_chunk_that_finishes_in_time_complete() -> None:
    async def scenario() -> _FakeQueue:
        started = asyncio.Event()

        async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
            started.set()
            await asyncio.sleep(0.01)
            return stats

        queue = _FakeQueue([_leased()])
        settings = LeaseLoopSettings(worker_id="w", heartbeat_seconds=10, drain_seconds=10)
        await _shut_down_when(started, queue, run_chunk, settings)
        return queue

    queue = asyncio.run(scenario())
    assert len(queue.completed) == 1 and queue.failed == []


def test_failure_status_maps_codes_and_unknown_errors() -> None:
    status, retryable = failure_status(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert status.code == code_value(grpc.StatusCode.RESOURCE_EXHAUSTED) and retryable
    status, retryable = failure_status(RuntimeError("bug"))
    assert status.code == code_value(grpc.StatusCode.INTERNAL) and not retryable
    assert "bug" in status.message


def test_backoff_grows_to_its_ceiling_and_resets() -> None:
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(ceiling / 2 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def _lease(number: int) -> chunks_pb2.LeaseChunkResponse:
    lease = chunks_pb2.ChunkLease(lease_id=f"lease-{number}", job_id="job-1", chunk_index=number)
    return chunks_pb2.LeaseChunkResponse(has_lease=True, lease=lease)


def test_the_next_chunk_is_leased_while_the_last_one_finishes_its_segment() -> None:
    first_done = asyncio.Event()
    completed_when_second_started: list[list[str]] = []
    queue = _FakeQueue([_lease(1), _lease(2)])

    async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        if lease.lease_id == "lease-1":
            stats.frames_sent.set()
            await first_done.wait()
        else:
            completed_when_second_started.append([request.lease_id for request in queue.completed])
            first_done.set()
        return stats

    _run_until_leases_are_used(queue, run_chunk)
    assert completed_when_second_started == [[]]
    assert sorted(request.lease_id for request in queue.completed) == ["lease-1", "lease-2"]


def test_a_slot_holds_at_most_one_finishing_chunk_beside_the_computing_one() -> None:
    running: list[str] = []
    most_at_once = 0

    async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        nonlocal most_at_once
        running.append(lease.lease_id)
        most_at_once = max(most_at_once, len(running))
        stats.frames_sent.set()
        for _ in range(20):  # the encoder's flush: control returns to the loop many times
            await asyncio.sleep(0)
        running.remove(lease.lease_id)
        return stats

    queue = _FakeQueue([_lease(number) for number in range(1, 6)])
    _run_until_leases_are_used(queue, run_chunk)
    assert most_at_once == 2
    assert len(queue.completed) == 5


def test_shutdown_drains_both_the_finishing_and_the_computing_chunk() -> None:
    async def scenario() -> _FakeQueue:
        second_started = asyncio.Event()

        async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
            if lease.lease_id == "lease-1":
                stats.frames_sent.set()
            else:
                second_started.set()
            await asyncio.Event().wait()
            return stats

        queue = _FakeQueue([_lease(1), _lease(2)])
        await _shut_down_when(second_started, queue, run_chunk)
        return queue

    queue = asyncio.run(scenario())
    assert sorted(request.lease_id for request in queue.failed) == ["lease-1", "lease-2"]
    assert all(request.retryable for request in queue.failed)


class _Readiness:
    """Models that are not ready for the first `not_ready_polls` checks, then ready."""

    def __init__(self, not_ready_polls: int) -> None:
        self._not_ready_polls = not_ready_polls
        self.polls = 0
        self.lease_calls_while_not_ready = 0
        self.queue: _FakeQueue | None = None

    async def __call__(self) -> bool:
        self.polls += 1
        ready = self.polls > self._not_ready_polls
        if not ready and self.queue is not None:
            self.lease_calls_while_not_ready = max(self.lease_calls_while_not_ready, self.queue.lease_calls)
        return ready


def test_no_chunk_is_leased_until_the_models_are_ready_and_the_wait_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run_chunk(lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        return stats

    queue = _FakeQueue([_leased()])
    readiness = _Readiness(not_ready_polls=6)
    readiness.queue = queue

    async def scenario() -> None:
        task = asyncio.create_task(LeaseLoop(queue, run_chunk, _settings(), ready=readiness).run())
        await asyncio.wait_for(queue.leases_exhausted.wait(), timeout=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="services.worker.lease_loop"):
        asyncio.run(scenario())
    assert readiness.polls > 6
    assert readiness.lease_calls_while_not_ready == 0
    assert len(queue.completed) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert [message for message in messages if "not ready" in message] == [
        "models are not ready; no chunk is leased until they are"
    ]
    assert [message for message in messages if "ready again" in message] == ["models are ready again; leasing chunks"]

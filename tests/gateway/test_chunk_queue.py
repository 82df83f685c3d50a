from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    code_value,
)
from services.common.media_info import MediaInfo
from services.gateway.chunk_planner import output_uri, plan_chunks
from services.gateway.chunk_queue import ChunkLease, ChunkQueue
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_images import write_media_file
from services.gateway.job_records import ChunkRecord, ChunkStats, JobError, JobRecord
from services.gateway.job_store import SqliteJobStore
from services.gateway.retry_policy import RetryPolicy
from tests.gateway.gateway_fakes import FakeMedia, ManualClock, job_record, planned_chunks

LEASE_SECONDS = 30.0
SOURCE_BYTES = b"source-bytes"
# Backoff 1, 2, 4, 8, 16, 30, 30 ... s; two minutes of failures before a chunk gives up.
RETRY = RetryPolicy(budget_seconds=120.0, initial_backoff_seconds=1.0, max_backoff_seconds=30.0, max_attempts=50)
UNAVAILABLE = JobError(code_value(grpc.StatusCode.UNAVAILABLE), "triton went away")


@dataclass
class Harness:
    store: SqliteJobStore
    clock: ManualClock
    media: FakeMedia
    coordinator: JobCoordinator
    queue: ChunkQueue
    media_root: Path

    async def add_job(self, job_id: str, sizes: list[int], target: MediaInfo | None = None) -> None:
        self.clock.advance(1.0)
        job = job_record(job_id, self.clock(), target=target)
        write_media_file(self.media_root, job.source_image_uri, SOURCE_BYTES)
        self.store.add_job(job, planned_chunks(job_id, sizes))
        await self.coordinator.changed(job_id)
        await self.queue.work_added()

    def job_state(self, job_id: str) -> str:
        return self.job(job_id).state

    def job(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        assert job is not None
        return job

    def chunk(self, job_id: str, index: int) -> ChunkRecord:
        return self.store.list_chunks(job_id)[index]

    async def lease(self, worker_id: str = "w1") -> ChunkLease:
        lease = await self.queue.lease(worker_id, 0)
        assert lease is not None
        return lease

    async def complete(self, lease: ChunkLease) -> None:
        await self.queue.complete(lease.lease_id, lease.segment_uri, ChunkStats(lease.chunk.frame_count, 1, 1))


def run(
    tmp_path: Path,
    scenario: Callable[[Harness], Awaitable[None]],
    retry: RetryPolicy = RETRY,
    stall_deadline_seconds: float = 0.0,
) -> None:
    async def main() -> None:
        store = SqliteJobStore(":memory:", tmp_path)
        clock, media = ManualClock(), FakeMedia()

        async def sleep(seconds: float) -> None:
            # The join's backoff passes on the manual clock, at once.
            clock.advance(seconds)
            await asyncio.sleep(0)

        coordinator = JobCoordinator(store, media, tmp_path, retry, clock, sleep=sleep)
        queue = ChunkQueue(coordinator, LEASE_SECONDS, retry, stall_deadline_seconds)
        await scenario(Harness(store, clock, media, coordinator, queue, tmp_path))

    asyncio.run(main())


def open_chunks_gauge(state: str) -> float | None:
    return REGISTRY.get_sample_value("swapline_gateway_chunks_open", {"state": state})


def test_lease_waits_for_work_and_is_woken_by_a_new_chunk(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        waiting = asyncio.create_task(h.queue.lease("w1", wait_seconds=30.0))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not waiting.done()
        await h.add_job("a", [10])
        lease = await asyncio.wait_for(waiting, timeout=5.0)
        assert lease is not None
        assert (lease.chunk.job_id, lease.chunk.index, lease.chunk.attempts) == ("a", 0, 1)
        assert lease.source_image == SOURCE_BYTES and lease.reference_image == b""
        assert lease.lease_seconds == LEASE_SECONDS and lease.segment_uri == "work/a/chunk-00000-a1.mp4"
        assert h.job_state("a") == "RUNNING"

    run(tmp_path, scenario)


def test_lease_without_work_gives_up_after_its_wait(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        assert await h.queue.lease("w1", wait_seconds=0.0) is None
        assert await asyncio.wait_for(h.queue.lease("w1", wait_seconds=0.05), timeout=5.0) is None

    run(tmp_path, scenario)


def test_open_chunks_gauge_follows_leases(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10, 10])
        assert (open_chunks_gauge("PENDING"), open_chunks_gauge("LEASED")) == (3, 0)
        await h.queue.lease("w1", 0)
        assert (open_chunks_gauge("PENDING"), open_chunks_gauge("LEASED")) == (2, 1)

    run(tmp_path, scenario)


def test_lapsed_lease_is_requeued_after_a_backoff_and_counts_an_attempt(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        first = await h.lease()
        h.clock.advance(LEASE_SECONDS - 1)
        assert await h.queue.reap_lapsed() == 0
        h.clock.advance(2)
        assert await h.queue.reap_lapsed() == 1
        chunk = h.chunk("a", 0)
        assert chunk.state == "PENDING" and chunk.attempts == 1 and chunk.not_before == h.clock() + 1.0
        assert chunk.last_error is not None and "lease lapsed" in chunk.last_error.message
        stale = await h.queue.heartbeat(first.lease_id, 5, "swap", 1)
        assert stale.stop
        assert await h.queue.lease("w2", 0) is None
        h.clock.advance(1.0)
        second = await h.lease("w2")
        assert second.chunk.attempts == 2 and second.lease_id != first.lease_id
        assert h.job_state("a") == "RUNNING"

    run(tmp_path, scenario)


def test_heartbeats_extend_the_lease(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        lease = await h.queue.lease("w1", 0)
        assert lease is not None
        for _ in range(3):
            h.clock.advance(LEASE_SECONDS - 1)
            answer = await h.queue.heartbeat(lease.lease_id, 5, "detect", 2)
            assert not answer.stop
            assert await h.queue.reap_lapsed() == 0
        h.clock.advance(LEASE_SECONDS + 1)
        answer = await h.queue.heartbeat(lease.lease_id, 6, "detect", 2)
        assert answer.stop and "lapsed" in answer.reason
        assert h.store.list_chunks("a")[0].state == "PENDING"

    run(tmp_path, scenario)


def test_the_attempt_limit_still_bounds_retries(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10])
        for _ in range(2):
            lease = await h.lease()
            assert lease.chunk.index == 0
            h.clock.advance(LEASE_SECONDS + 1)
            await h.queue.reap_lapsed()
            h.clock.advance(1.0)
        job = h.job("a")
        assert job.state == "FAILED" and job.error is not None
        assert job.error.message.startswith("chunk 0 failed after 2 attempts, failing for 32 s: lease lapsed")
        assert job.error.code == code_value(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert [chunk.state for chunk in h.store.list_chunks("a")] == ["FAILED", "CANCELLED"]
        assert json.loads(job.report_json)["state"] == "FAILED"
        assert await h.queue.lease("w1", 0) is None

    run(tmp_path, scenario, retry=replace(RETRY, max_attempts=2))


def test_retryable_failures_back_off_exponentially_and_an_outage_is_waited_out(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        for backoff in (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0):
            lease = await h.lease()
            await h.queue.fail(lease.lease_id, UNAVAILABLE, retryable=True)
            assert h.chunk("a", 0).not_before == h.clock() + backoff
            assert await h.queue.lease("w1", 0) is None
            h.clock.advance(backoff)
        # 91 s of failures, eight attempts: the outage is over and the chunk still runs.
        await h.complete(await h.lease())
        await h.coordinator.wait_for_joins()
        assert h.job_state("a") == "SUCCEEDED"

    run(tmp_path, scenario)


def test_the_retry_budget_is_time_since_the_first_failure_and_ends_with_the_last_error(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        started = h.clock()
        failures = 0
        while h.job_state("a") == "RUNNING" or failures == 0:
            lease = await h.lease()
            await h.queue.fail(lease.lease_id, UNAVAILABLE, retryable=True)
            failures += 1
            h.clock.now = max(h.clock(), h.chunk("a", 0).not_before)
        # Tries at 0, 1, 3, 7, 11, 15, 19 and, cut to the budget's end, 20 s.
        assert failures == 8 and h.clock() == started + 20.0
        job = h.job("a")
        assert job.state == "FAILED"
        assert job.error == JobError(
            UNAVAILABLE.code, "chunk 0 failed after 8 attempts, failing for 20 s: triton went away"
        )

    run(tmp_path, scenario, retry=replace(RETRY, budget_seconds=20.0, max_backoff_seconds=4.0))


def test_a_queued_chunk_nobody_leases_fails_once_its_budget_is_spent(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        await h.queue.fail((await h.lease()).lease_id, UNAVAILABLE, retryable=True)
        # Past the budget, but every worker may have been waiting out the same outage on another chunk:
        # the chunk gets one budget more to be taken.
        h.clock.advance(39.0)
        assert await h.queue.fail_spent_budgets() == 0
        assert h.job("a").state == "RUNNING"
        h.clock.advance(2.0)
        await h.queue.reap_once()
        job = h.job("a")
        assert job.state == "FAILED" and job.error is not None and job.error.code == UNAVAILABLE.code
        assert job.error.message == "chunk 0 failed after 1 attempts, failing for 41 s: triton went away"

    run(tmp_path, scenario, retry=replace(RETRY, budget_seconds=20.0))


def test_a_waiting_worker_is_woken_when_a_backing_off_chunk_becomes_due(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        await h.queue.fail((await h.lease()).lease_id, UNAVAILABLE, retryable=True)
        # The chunk comes due while the worker waits; no new work arrives to wake it.
        asyncio.get_running_loop().call_later(0.2, h.clock.advance, 1.0)
        started = time.monotonic()
        lease = await asyncio.wait_for(h.queue.lease("w2", wait_seconds=30.0), timeout=10.0)
        assert lease is not None and lease.chunk.attempts == 2
        assert time.monotonic() - started < 5.0

    run(tmp_path, scenario)


def test_fatal_failure_fails_its_job_cancels_its_chunks_and_spares_other_jobs(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10, 10])
        await h.add_job("b", [10, 10])
        a0 = await h.queue.lease("w1", 0)
        a1 = await h.queue.lease("w2", 0)
        assert a0 is not None and a1 is not None and a1.chunk.job_id == "a"
        error = JobError(code_value(grpc.StatusCode.INVALID_ARGUMENT), "frame 12 is corrupt")
        await h.queue.fail(a0.lease_id, error, retryable=False)
        job = h.store.get_job("a")
        assert job is not None and job.state == "FAILED"
        assert job.error == JobError(error.code, "chunk 0 failed: frame 12 is corrupt")
        assert [chunk.state for chunk in h.store.list_chunks("a")] == ["FAILED", "CANCELLED", "CANCELLED"]
        stop = await h.queue.heartbeat(a1.lease_id, 3, "swap", 3)
        assert stop.stop and "failed" in stop.reason
        leases = [await h.queue.lease("w1", 0), await h.queue.lease("w1", 0)]
        assert [(lease.chunk.job_id, lease.chunk.index) for lease in leases if lease] == [("b", 0), ("b", 1)]
        assert h.job_state("b") == "RUNNING"

    run(tmp_path, scenario)


def test_cancel_stops_heartbeats_and_refuses_completion(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10])
        lease = await h.queue.lease("w1", 0)
        assert lease is not None
        assert not (await h.queue.heartbeat(lease.lease_id, 1, "decode", 0)).stop
        cancelled = await h.coordinator.cancel_job("a")
        assert cancelled.state == "CANCELLED"
        answer = await h.queue.heartbeat(lease.lease_id, 2, "decode", 0)
        assert answer.stop and "cancelled" in answer.reason
        with pytest.raises(FailedPrecondition, match="cancelled"):
            await h.queue.complete(lease.lease_id, "", ChunkStats(10, 10, 10))
        assert await h.queue.lease("w1", 0) is None
        with pytest.raises(FailedPrecondition, match="already ended"):
            await h.coordinator.cancel_job("a")

    run(tmp_path, scenario)


def test_completing_every_chunk_joins_segments_in_order_and_succeeds(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10, 5])
        leases = [await h.lease(f"w{n}") for n in range(3)]
        # Completed out of order: the join must still list segments by chunk index.
        for lease in reversed(leases):
            stats = ChunkStats(lease.chunk.frame_count, 1, 1, {"swap": 0.5})
            await h.queue.complete(lease.lease_id, "", stats)
        assert h.job_state("a") in ("JOINING", "SUCCEEDED")
        await h.coordinator.wait_for_joins()
        assert h.media.joins == [
            (
                ["work/a/chunk-00000-a1.mp4", "work/a/chunk-00001-a1.mp4", "work/a/chunk-00002-a1.mp4"],
                "a.mp4",
                "outputs/a/output.mp4",
            )
        ]
        assert h.media.expected_frames == [h.job("a").frames_total]
        job = h.job("a")
        assert job.state == "SUCCEEDED" and job.frames_done == 25
        report = json.loads(job.report_json)
        assert report["frames"] == 25 and report["chunks"] == 3 and report["state"] == "SUCCEEDED"
        assert (h.media_root / "outputs/a/report.json").read_text() == job.report_json
        # The work area, the source image with it, goes once the job has succeeded.
        assert not (h.media_root / "work/a").exists()

    run(tmp_path, scenario)


def test_a_re_leased_chunks_old_lease_cannot_complete_it_nor_write_its_segment(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        stale = await h.lease("w1")
        h.clock.advance(LEASE_SECONDS + 1)
        await h.queue.reap_lapsed()
        h.clock.advance(1.0)
        current = await h.lease("w2")
        assert current.chunk.attempts == 2
        assert stale.segment_uri != current.segment_uri == "work/a/chunk-00000-a2.mp4"
        with pytest.raises(FailedPrecondition, match="went to another worker"):
            await h.complete(stale)
        assert (await h.queue.heartbeat(stale.lease_id, 10, "encode", 1)).stop
        assert h.chunk("a", 0).state == "LEASED"
        await h.complete(current)
        await h.coordinator.wait_for_joins()
        assert h.job_state("a") == "SUCCEEDED"
        assert h.media.joins[0][0] == ["work/a/chunk-00000-a2.mp4"]

    run(tmp_path, scenario)


def test_a_completion_with_another_frame_count_is_refused_and_the_chunk_retried(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        short = await h.lease()
        with pytest.raises(FailedPrecondition, match="holds 9 frames, not 10"):
            await h.queue.complete(short.lease_id, short.segment_uri, ChunkStats(9, 1, 1))
        chunk = h.chunk("a", 0)
        assert chunk.state == "PENDING" and chunk.last_error is not None
        assert chunk.last_error.code == code_value(grpc.StatusCode.DATA_LOSS)
        assert h.job_state("a") == "RUNNING"
        h.clock.advance(1.0)
        await h.complete(await h.lease())
        await h.coordinator.wait_for_joins()
        assert h.job_state("a") == "SUCCEEDED"

    run(tmp_path, scenario)


def test_a_completion_naming_another_segment_is_refused(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        lease = await h.lease()
        with pytest.raises(InvalidArgument, match="is not this lease's segment"):
            await h.queue.complete(lease.lease_id, "outputs/other/output.mp4", ChunkStats(10, 1, 1))
        assert h.chunk("a", 0).state == "LEASED"

    run(tmp_path, scenario)


def test_a_lease_whose_source_image_is_gone_fails_its_job(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10])
        (h.media_root / h.job("a").source_image_uri).unlink()
        assert await h.queue.lease("w1", 0) is None
        job = h.job("a")
        assert job.state == "FAILED" and job.error is not None
        assert job.error.code == code_value(grpc.StatusCode.NOT_FOUND) and "images" in job.error.message
        assert str(tmp_path) not in job.error.message

    run(tmp_path, scenario)


def test_a_retryable_join_failure_is_tried_again_after_a_backoff(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.media.join_errors = [Unavailable("encoder is down"), DeadlineExceeded("encoder is slow")]
        await h.add_job("a", [10])
        await h.complete(await h.lease())
        joined_from = h.clock()
        await h.coordinator.wait_for_joins()
        assert h.job_state("a") == "SUCCEEDED" and len(h.media.joins) == 3
        assert h.clock() == joined_from + 1.0 + 2.0

    run(tmp_path, scenario)


def test_a_join_failing_past_the_budget_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.media.join_errors = [Unavailable("encoder is down")] * 20
        await h.add_job("a", [10])
        await h.complete(await h.lease())
        await h.coordinator.wait_for_joins()
        job = h.job("a")
        assert job.state == "FAILED"
        # Tries at 0, 1, 3, 7 and, cut to the budget's end, 10 s.
        assert job.error == JobError(
            code_value(grpc.StatusCode.UNAVAILABLE), "joining segments failed 5 times in 10 s: encoder is down"
        )

    run(tmp_path, scenario, retry=replace(RETRY, budget_seconds=10.0))


def test_a_join_failure_that_is_not_retryable_fails_the_job_at_once(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.media.join_errors = [FailedPrecondition("the output holds 99 frames, not 100")]
        await h.add_job("a", [10])
        await h.complete(await h.lease())
        await h.coordinator.wait_for_joins()
        job = h.job("a")
        assert job.state == "FAILED" and len(h.media.joins) == 1
        assert job.error == JobError(
            code_value(grpc.StatusCode.FAILED_PRECONDITION),
            "joining segments failed: the output holds 99 frames, not 100",
        )

    run(tmp_path, scenario)


def test_a_joined_output_with_another_frame_count_fails_the_job(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.media.frames_joined = 99
        await h.add_job("a", [10])
        await h.complete(await h.lease())
        await h.coordinator.wait_for_joins()
        job = h.job("a")
        assert job.state == "FAILED" and job.error is not None
        assert job.error.code == code_value(grpc.StatusCode.DATA_LOSS) and "99 frames" in job.error.message

    run(tmp_path, scenario)


def test_jobs_left_joining_by_a_previous_process_are_joined_again(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        lease = await h.lease()
        h.store.finish_chunk("a", 0, lease.lease_id, lease.segment_uri, ChunkStats(10, 10, 10), h.clock())
        h.store.transition_job("a", ["RUNNING"], "JOINING", h.clock())
        assert h.store.recover_after_restart() == ["a"]
        await h.coordinator.resume_joins(["a"])
        assert h.job_state("a") == "SUCCEEDED"
        assert len(h.media.joins) == 1

    run(tmp_path, scenario)


def test_an_image_job_takes_its_single_segment_as_the_output(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        image = MediaInfo("image", 0.0, 0.0, 1, 64, 48, False, ())
        chunks = plan_chunks("img", image, chunk_seconds=2.0)
        job = replace(job_record("img", h.clock(), target=image), output_uri=output_uri("img", "image"), frames_total=1)
        write_media_file(h.media_root, job.source_image_uri, SOURCE_BYTES)
        h.store.add_job(job, chunks)
        lease = await h.lease()
        assert lease.segment_uri == "work/img/chunk-00000-a1.png"
        (h.media_root / lease.segment_uri).write_bytes(b"swapped picture")
        await h.complete(lease)
        await h.coordinator.wait_for_joins()
        assert h.job_state("img") == "SUCCEEDED" and h.media.joins == []
        assert (h.media_root / "outputs/img/output.png").read_bytes() == b"swapped picture"
        assert not (h.media_root / "work/img").exists()

    run(tmp_path, scenario)


async def beat(h: Harness, lease: ChunkLease, frames_done: int, after_seconds: float) -> None:
    h.clock.advance(after_seconds)
    assert not (await h.queue.heartbeat(lease.lease_id, frames_done, "swap", frames_done)).stop


def test_a_job_whose_chunks_make_no_progress_fails_after_the_stall_deadline(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        # Queued time does not count: no worker took the chunk for ten minutes.
        h.clock.advance(600.0)
        assert await h.queue.fail_stalled_jobs() == 0
        lease = await h.lease()
        await beat(h, lease, 5, after_seconds=20.0)
        # Heartbeats keep the lease, but the frames stay at 5 (Triton is gone).
        for _ in range(5):
            await beat(h, lease, 5, after_seconds=20.0)
        assert await h.queue.fail_stalled_jobs() == 0
        h.clock.advance(1.0)
        await h.queue.reap_once()
        job = h.job("a")
        assert job.state == "FAILED" and job.error == JobError(
            code_value(grpc.StatusCode.DEADLINE_EXCEEDED),
            "no progress for 101 s in chunk 0 (stage swap, 5 of 10 frames, worker 'w1'); the stall deadline is 100 s",
        )
        assert (await h.queue.heartbeat(lease.lease_id, 6, "swap", 6)).stop

    run(tmp_path, scenario, stall_deadline_seconds=100.0)


def test_progress_keeps_a_slow_job_alive_and_a_zero_deadline_is_none(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        lease = await h.lease()
        for frames in range(1, 10):
            await beat(h, lease, frames, after_seconds=25.0)
            await h.queue.reap_once()
        assert h.job_state("a") == "RUNNING"

    run(tmp_path, scenario, stall_deadline_seconds=30.0)

    async def without_deadline(h: Harness) -> None:
        await h.add_job("a", [10])
        lease = await h.lease()
        for _ in range(10):
            await beat(h, lease, 0, after_seconds=25.0)
        assert await h.queue.fail_stalled_jobs() == 0 and h.job_state("a") == "RUNNING"

    run(tmp_path, without_deadline, stall_deadline_seconds=0.0)

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.errors import FailedPrecondition, Unavailable, code_value
from services.common.media_info import MediaInfo
from services.gateway.chunk_planner import output_uri, plan_chunks
from services.gateway.chunk_queue import ChunkQueue
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_records import ChunkStats, JobError
from services.gateway.job_store import SqliteJobStore
from tests.gateway.gateway_fakes import FakeMedia, ManualClock, job_record, planned_chunks

LEASE_SECONDS = 30.0


@dataclass
class Harness:
    store: SqliteJobStore
    clock: ManualClock
    media: FakeMedia
    coordinator: JobCoordinator
    queue: ChunkQueue
    media_root: Path

    async def add_job(self, job_id: str, sizes: list[int]) -> None:
        self.clock.advance(1.0)
        self.store.add_job(job_record(job_id, self.clock()), planned_chunks(job_id, sizes))
        await self.coordinator.changed(job_id)
        await self.queue.work_added()

    def job_state(self, job_id: str) -> str:
        job = self.store.get_job(job_id)
        assert job is not None
        return job.state


def run(tmp_path: Path, scenario: Callable[[Harness], Awaitable[None]], max_attempts: int = 3) -> None:
    async def main() -> None:
        store = SqliteJobStore(":memory:")
        clock, media = ManualClock(), FakeMedia()
        coordinator = JobCoordinator(store, media, tmp_path, clock)
        queue = ChunkQueue(coordinator, LEASE_SECONDS, max_attempts)
        await scenario(Harness(store, clock, media, coordinator, queue, tmp_path))

    asyncio.run(main())


def pending_gauge() -> float | None:
    return REGISTRY.get_sample_value("swapline_gateway_chunks_pending")


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
        assert lease.job.source_image == b"source-bytes" and lease.lease_seconds == LEASE_SECONDS
        assert h.job_state("a") == "RUNNING"

    run(tmp_path, scenario)


def test_lease_without_work_gives_up_after_its_wait(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        assert await h.queue.lease("w1", wait_seconds=0.0) is None
        assert await asyncio.wait_for(h.queue.lease("w1", wait_seconds=0.05), timeout=5.0) is None

    run(tmp_path, scenario)


def test_pending_gauge_follows_leases(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10, 10])
        assert pending_gauge() == 3
        await h.queue.lease("w1", 0)
        assert pending_gauge() == 2

    run(tmp_path, scenario)


def test_lapsed_lease_is_requeued_and_counts_an_attempt(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        first = await h.queue.lease("w1", 0)
        assert first is not None
        h.clock.advance(LEASE_SECONDS - 1)
        assert await h.queue.reap_lapsed() == 0
        h.clock.advance(2)
        assert await h.queue.reap_lapsed() == 1
        chunk = h.store.list_chunks("a")[0]
        assert chunk.state == "PENDING" and chunk.attempts == 1
        assert chunk.last_error is not None and "lease lapsed" in chunk.last_error.message
        stale = await h.queue.heartbeat(first.lease_id, 5, "swap", 1)
        assert stale.stop
        second = await h.queue.lease("w2", 0)
        assert second is not None and second.chunk.attempts == 2 and second.lease_id != first.lease_id
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


def test_too_many_lapsed_attempts_fail_the_job(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10, 10])
        for _ in range(2):
            lease = await h.queue.lease("w1", 0)
            assert lease is not None and lease.chunk.index == 0
            h.clock.advance(LEASE_SECONDS + 1)
            await h.queue.reap_lapsed()
        job = h.store.get_job("a")
        assert job is not None and job.state == "FAILED" and job.error is not None
        assert job.error.message.startswith("chunk 0 failed after 2 attempts: lease lapsed")
        assert job.error.code == code_value(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert [chunk.state for chunk in h.store.list_chunks("a")] == ["FAILED", "CANCELLED"]
        assert json.loads(job.report_json)["state"] == "FAILED"
        assert await h.queue.lease("w1", 0) is None

    run(tmp_path, scenario, max_attempts=2)


def test_retryable_failure_requeues_until_the_attempt_limit(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        error = JobError(code_value(grpc.StatusCode.UNAVAILABLE), "triton went away")
        for attempt in (1, 2, 3):
            lease = await h.queue.lease("w1", 0)
            assert lease is not None and lease.chunk.attempts == attempt
            await h.queue.fail(lease.lease_id, error, retryable=True)
        job = h.store.get_job("a")
        assert job is not None and job.state == "FAILED" and job.error is not None
        assert job.error == JobError(error.code, "chunk 0 failed after 3 attempts: triton went away")

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
        leases = [await h.queue.lease(f"w{n}", 0) for n in range(3)]
        # Completed out of order: the join must still list segments by chunk index.
        for lease in reversed(leases):
            assert lease is not None
            stats = ChunkStats(lease.chunk.frame_count, 1, 1, {"swap": 0.5})
            await h.queue.complete(lease.lease_id, "", stats)
        assert h.job_state("a") in ("JOINING", "SUCCEEDED")
        await h.coordinator.wait_for_joins()
        assert h.media.joins == [
            (
                ["work/a/chunk-00000.mp4", "work/a/chunk-00001.mp4", "work/a/chunk-00002.mp4"],
                "a.mp4",
                "outputs/a/output.mp4",
            )
        ]
        job = h.store.get_job("a")
        assert job is not None and job.state == "SUCCEEDED" and job.frames_done == 25
        report = json.loads(job.report_json)
        assert report["frames"] == 25 and report["chunks"] == 3 and report["state"] == "SUCCEEDED"
        assert (h.media_root / "outputs/a/report.json").read_text() == job.report_json

    run(tmp_path, scenario)


def test_a_failed_join_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.media.join_error = Unavailable("encoder is down")
        await h.add_job("a", [10])
        lease = await h.queue.lease("w1", 0)
        assert lease is not None
        await h.queue.complete(lease.lease_id, "", ChunkStats(10, 10, 10))
        await h.coordinator.wait_for_joins()
        job = h.store.get_job("a")
        assert job is not None and job.state == "FAILED"
        assert job.error == JobError(
            code_value(grpc.StatusCode.UNAVAILABLE), "joining segments failed: encoder is down"
        )

    run(tmp_path, scenario)


def test_jobs_left_joining_by_a_previous_process_are_joined_again(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        await h.add_job("a", [10])
        lease = await h.queue.lease("w1", 0)
        assert lease is not None
        h.store.finish_chunk("a", 0, lease.chunk.segment_uri, ChunkStats(10, 10, 10))
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
        job = replace(job_record("img", h.clock(), target=image), output_uri=output_uri("img", "image"))
        h.store.add_job(job, chunks)
        lease = await h.queue.lease("w1", 0)
        assert lease is not None and lease.chunk.segment_uri == "work/img/chunk-00000.png"
        (h.media_root / "work/img").mkdir(parents=True)
        (h.media_root / lease.chunk.segment_uri).write_bytes(b"swapped picture")
        await h.queue.complete(lease.lease_id, "", ChunkStats(1, 1, 1))
        await h.coordinator.wait_for_joins()
        assert h.job_state("img") == "SUCCEEDED" and h.media.joins == []
        assert (h.media_root / "outputs/img/output.png").read_bytes() == b"swapped picture"
        assert not (h.media_root / "work/img").exists()

    run(tmp_path, scenario)

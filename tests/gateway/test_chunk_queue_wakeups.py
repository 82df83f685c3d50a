"""A lease looks for a chunk on the store's thread and then waits: work added between the two still wakes it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from services.gateway.chunk_queue import ChunkQueue
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_images import write_media_file
from services.gateway.job_records import ChunkRecord
from services.gateway.job_store import SqliteJobStore
from services.gateway.retry_policy import RetryPolicy
from services.gateway.tenant_chunk_limits import NO_TENANT_CHUNK_LIMITS, TenantChunkLimits
from tests.gateway.gateway_fakes import FakeMedia, ManualClock, job_record, planned_chunks

RETRY = RetryPolicy(budget_seconds=120.0, initial_backoff_seconds=1.0, max_backoff_seconds=30.0, max_attempts=5)
# Far past the test's own timeout: only the wake-up can end the wait in time.
LEASE_WAIT_SECONDS = 60.0


class AddsWorkAfterTheFirstLook(SqliteJobStore):
    """Finds no chunk on the first look, and then, before the lease can wait, has work added: as a submission
    that lands between the look and the wait."""

    def __init__(self, media_root: Path, add_work: Callable[[], None]) -> None:
        super().__init__(":memory:", media_root)
        self._add_work = add_work
        self.looks = 0

    def lease_next_chunk(
        self,
        worker_id: str,
        lease_id: str,
        now: float,
        expires_at: float,
        limits: TenantChunkLimits = NO_TENANT_CHUNK_LIMITS,
    ) -> ChunkRecord | None:
        chunk = super().lease_next_chunk(worker_id, lease_id, now, expires_at, limits)
        self.looks += 1
        if self.looks == 1:
            self._add_work()
        return chunk


def test_work_added_while_a_lease_looks_in_the_store_wakes_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        clock = ManualClock()
        job = job_record("a", clock())
        write_media_file(tmp_path, job.source_image_uri, b"source")

        def add_work() -> None:
            # On the store's thread, as the job's submission would run there; its wake-up goes to the loop.
            store.add_job(job, planned_chunks("a", [10]))
            asyncio.run_coroutine_threadsafe(queue.work_added(), loop)

        store = AddsWorkAfterTheFirstLook(tmp_path, add_work)
        coordinator = JobCoordinator(store, FakeMedia(), tmp_path, RETRY, clock)
        queue = ChunkQueue(coordinator, 30.0, RETRY)
        try:
            lease = await asyncio.wait_for(queue.lease("w", LEASE_WAIT_SECONDS), 10.0)
        finally:
            store.close()
        assert lease is not None and lease.chunk.job_id == "a"
        assert store.looks == 2

    asyncio.run(scenario())

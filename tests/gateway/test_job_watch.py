"""A watch never waits unbounded: a job that never changes still gets keepalive events."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from services.common.input_limits import DEFAULT_INPUT_LIMITS
from services.gateway.chunk_queue import ChunkQueue
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_service import JobService
from services.gateway.job_store import SqliteJobStore
from services.gateway.retry_policy import RetryPolicy
from tests.gateway.gateway_fakes import FakeMedia, job_record, planned_chunks

KEEPALIVE_SECONDS = 0.2
RETRY = RetryPolicy(budget_seconds=60.0, initial_backoff_seconds=1.0, max_backoff_seconds=10.0, max_attempts=5)


def job_service(store: SqliteJobStore, media_root: Path) -> JobService:
    media = FakeMedia()
    coordinator = JobCoordinator(store, media, media_root, RETRY)
    queue = ChunkQueue(coordinator, 30.0, RETRY)
    return JobService(
        coordinator,
        queue,
        media,
        media_root,
        chunk_seconds=1.0,
        max_upload_bytes=1000,
        limits=DEFAULT_INPUT_LIMITS,
        watch_keepalive_seconds=KEEPALIVE_SECONDS,
    )


def test_a_watch_of_a_job_that_never_changes_keeps_alive_within_its_bound(tmp_path: Path) -> None:
    store = SqliteJobStore(":memory:", tmp_path)
    store.add_job(job_record("quiet", time.time()), planned_chunks("quiet", [10]))
    jobs = job_service(store, tmp_path)

    async def scenario() -> None:
        watch = jobs.watch("quiet", None)
        first = await anext(watch)
        keepalives = [await asyncio.wait_for(anext(watch), 5.0) for _ in range(2)]
        assert [event.job for event in keepalives] == [first.job, first.job]
        assert first.at < keepalives[0].at < keepalives[1].at

    asyncio.run(scenario())
    store.close()

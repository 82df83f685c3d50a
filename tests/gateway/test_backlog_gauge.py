"""The open-backlog gauge: every open chunk by state, refreshed from the store off the event loop, including
changes another gateway made to the shared store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_records import ChunkState
from services.gateway.job_store import SqliteJobStore
from services.gateway.retry_policy import RetryPolicy
from tests.gateway.gateway_fakes import FakeMedia, job_record, planned_chunks

RETRY = RetryPolicy(budget_seconds=60.0, initial_backoff_seconds=1.0, max_backoff_seconds=8.0, max_attempts=5)
REFRESH_SECONDS = 0.05
WAIT_SECONDS = 10.0


class ThreadRecordingStore(SqliteJobStore):
    """Records the threads that count open chunks."""

    def __init__(self, path: Path, media_root: Path) -> None:
        super().__init__(path, media_root)
        self.counting_threads: set[int] = set()

    def count_open_chunks_by_state(self) -> dict[ChunkState, int]:
        self.counting_threads.add(threading.get_ident())
        return super().count_open_chunks_by_state()


def open_chunks(state: ChunkState) -> float | None:
    return REGISTRY.get_sample_value("swapline_gateway_chunks_open", {"state": state})


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[SqliteJobStore, ThreadRecordingStore]]:
    """Two connections to one store file: one where jobs change, one the gateway under test reads."""
    database = tmp_path / "jobs.db"
    writer = SqliteJobStore(database, tmp_path)
    reader = ThreadRecordingStore(database, tmp_path)
    yield writer, reader
    reader.close()
    writer.close()


async def wait_for_gauges(expected: dict[ChunkState, float]) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while {state: open_chunks(state) for state in expected} != expected:
            await asyncio.sleep(REFRESH_SECONDS / 2)


def test_the_gauge_follows_changes_made_through_another_connection(
    stores: tuple[SqliteJobStore, ThreadRecordingStore], tmp_path: Path
) -> None:
    writer, reader = stores

    async def scenario() -> None:
        coordinator = JobCoordinator(reader, FakeMedia(), tmp_path, RETRY)
        # Blocking, as when the gateway is assembled, before it serves.
        coordinator.publish_counts()
        assert (open_chunks("PENDING"), open_chunks("LEASED")) == (0, 0)
        reader.counting_threads.clear()
        refreshing = asyncio.create_task(coordinator.refresh_counts_forever(REFRESH_SECONDS))
        try:
            writer.add_job(job_record("a", 1.0), planned_chunks("a", [10, 10, 10]))
            writer.add_job(job_record("b", 2.0), planned_chunks("b", [10, 10]))
            writer.lease_next_chunk("w1", "lease-1", 10.0, 1e12)
            writer.lease_next_chunk("w2", "lease-2", 10.0, 1e12)
            # No event reached this gateway: only the periodic refresh can show the other's changes.
            await wait_for_gauges({"PENDING": 3, "LEASED": 2})
            # An ended job's chunks leave the backlog.
            assert writer.transition_job("b", ("QUEUED", "RUNNING"), "CANCELLED", 11.0)
            await wait_for_gauges({"PENDING": 1, "LEASED": 2})
        finally:
            refreshing.cancel()
            await asyncio.gather(refreshing, return_exceptions=True)
        assert reader.counting_threads
        assert threading.get_ident() not in reader.counting_threads, "the store was read on the event loop"

    asyncio.run(scenario())

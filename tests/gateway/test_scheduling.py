"""The order chunks are leased in (interactive jobs first, then the tenant holding the fewest leases, then the
oldest job) and per-tenant limits on leased chunks, on the SQLite store and through the chunk queue."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.gateway.chunk_queue import ChunkQueue
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_images import write_media_file
from services.gateway.job_records import LIVE_JOB_STATES, ChunkStats
from services.gateway.job_store import SqliteJobStore
from services.gateway.retry_policy import RetryPolicy
from services.gateway.tenant_chunk_limits import NO_TENANT_CHUNK_LIMITS, TenantChunkLimits
from tests.gateway.gateway_fakes import FakeMedia, ManualClock, job_record, planned_chunks

NOW = 100.0
LEASE_ENDS = 1e12
RETRY = RetryPolicy(budget_seconds=120.0, initial_backoff_seconds=1.0, max_backoff_seconds=30.0, max_attempts=5)
# Far past the test's own timeout: only a wake-up can end the wait in time.
LEASE_WAIT_SECONDS = 60.0
PROMPT_SECONDS = 10.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    opened = SqliteJobStore(":memory:", tmp_path)
    yield opened
    opened.close()


def add(
    store: SqliteJobStore, job_id: str, created_at: float, chunks: int, tenant: str = "acme", batch_id: str = ""
) -> None:
    job = replace(job_record(job_id, created_at, tenant=tenant), batch_id=batch_id)
    store.add_job(job, planned_chunks(job_id, [10] * chunks))


def lease(store: SqliteJobStore, limits: TenantChunkLimits = NO_TENANT_CHUNK_LIMITS) -> tuple[str, int] | None:
    """The (job, chunk index) leased next, or None."""
    chunk = store.lease_next_chunk("w", uuid.uuid4().hex, NOW, LEASE_ENDS, limits)
    return None if chunk is None else (chunk.job_id, chunk.index)


def leases(store: SqliteJobStore, count: int, limits: TenantChunkLimits = NO_TENANT_CHUNK_LIMITS) -> list[str]:
    """The jobs of the next `count` leases."""
    leased = [lease(store, limits) for _ in range(count)]
    return [chosen[0] if chosen else "-" for chosen in leased]


def finish(store: SqliteJobStore, job_id: str, index: int) -> None:
    (chunk,) = [chunk for chunk in store.list_chunks(job_id) if chunk.index == index]
    assert store.finish_chunk(job_id, index, chunk.lease_id, "segment", ChunkStats(10, 0, 0), NOW) is not None


def add_batch(store: SqliteJobStore, prefix: str, jobs: int, chunks: int, tenant: str = "acme") -> list[str]:
    job_ids = [f"{prefix}{number:02d}" for number in range(jobs)]
    for number, job_id in enumerate(job_ids):
        add(store, job_id, float(number), chunks, tenant, batch_id=prefix)
    return job_ids


def test_limits_exist_where_a_default_or_an_override_is_set() -> None:
    assert not NO_TENANT_CHUNK_LIMITS.has_limits
    assert not TenantChunkLimits(0, {"acme": 0}).has_limits
    assert TenantChunkLimits(0, {"acme": 1}).has_limits


def test_an_interactive_job_submitted_after_a_batch_is_leased_before_the_batchs_remaining_chunks(
    store: SqliteJobStore,
) -> None:
    batch = add_batch(store, "batch", jobs=12, chunks=2)
    assert leases(store, 3) == [batch[0], batch[0], batch[1]]
    add(store, "solo", 50.0, chunks=2)
    assert leases(store, 2) == ["solo", "solo"]
    # Then the batch again, in its order.
    assert lease(store) == (batch[1], 1)


def test_tenants_take_turns_however_early_one_submitted_a_large_batch(store: SqliteJobStore) -> None:
    acme = add_batch(store, "acme", jobs=4, chunks=3, tenant="acme")
    assert lease(store) == (acme[0], 0)
    beta = add_batch(store, "beta", jobs=2, chunks=3, tenant="beta")
    assert leases(store, 6) == [beta[0], acme[0], beta[0], acme[0], beta[0], acme[1]]


def test_a_tenant_at_its_limit_gets_no_lease_while_another_tenants_chunk_is_leased(store: SqliteJobStore) -> None:
    limits = TenantChunkLimits(2)
    acme = add_batch(store, "acme", jobs=2, chunks=3, tenant="acme")
    assert leases(store, 3, limits) == [acme[0], acme[0], "-"]
    add(store, "beta", 10.0, chunks=3, tenant="beta")
    assert leases(store, 3, limits) == ["beta", "beta", "-"]


def test_a_tenants_limit_frees_when_its_chunk_finishes_or_its_job_ends(store: SqliteJobStore) -> None:
    limits = TenantChunkLimits(1)
    add(store, "a", 1.0, chunks=3, tenant="acme")
    add(store, "b", 2.0, chunks=1, tenant="acme")
    assert leases(store, 2, limits) == ["a", "-"]
    finish(store, "a", 0)
    assert leases(store, 2, limits) == ["a", "-"]
    assert store.transition_job("a", LIVE_JOB_STATES, "CANCELLED", NOW)
    assert lease(store, limits) == ("b", 0)


def test_a_tenants_own_limit_beats_the_default(store: SqliteJobStore) -> None:
    limits = TenantChunkLimits(1, {"acme": 3, "beta": 0})
    for tenant in ("acme", "beta", "gamma"):
        add(store, tenant, 1.0, chunks=5, tenant=tenant)
    leased = leases(store, 10, limits)
    assert (leased.count("acme"), leased.count("beta"), leased.count("gamma")) == (3, 5, 1)


class SignalsFindingNothing(SqliteJobStore):
    """Says when a lease has looked and found no chunk it may lease (the queue then asks when one comes due)."""

    def __init__(self, media_root: Path) -> None:
        super().__init__(":memory:", media_root)
        self.found_nothing = threading.Event()

    def next_due_at(self, now: float) -> float | None:
        due = super().next_due_at(now)
        self.found_nothing.set()
        return due


def test_a_lease_held_back_by_its_tenants_limit_is_granted_when_a_chunk_of_the_tenant_completes(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        store = SignalsFindingNothing(tmp_path)
        job = job_record("a", clock(), tenant="acme")
        write_media_file(tmp_path, job.source_image_uri, b"source")
        store.add_job(job, planned_chunks("a", [10, 10]))
        queue = ChunkQueue(
            JobCoordinator(store, FakeMedia(), tmp_path, RETRY, clock), 30.0, RETRY, 0.0, TenantChunkLimits(1)
        )
        try:
            first = await queue.lease("w1", 0)
            assert first is not None
            waiting = asyncio.create_task(queue.lease("w2", LEASE_WAIT_SECONDS))
            assert await asyncio.to_thread(store.found_nothing.wait, PROMPT_SECONDS)
            await queue.complete(first.lease_id, first.segment_uri, ChunkStats(10, 0, 0))
            second = await asyncio.wait_for(waiting, PROMPT_SECONDS)
        finally:
            store.close()
        assert second is not None and second.chunk.index == 1

    asyncio.run(scenario())

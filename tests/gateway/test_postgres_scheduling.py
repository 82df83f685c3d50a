"""Scheduling with two gateways on one real PostgreSQL: leasing at once, they keep every tenant within its limit
and share the workers between tenants; a lease one gateway's tenant limit holds back is granted when a chunk of
the tenant finishes on the other gateway."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from services.gateway.chunk_queue import ChunkQueue
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_images import write_media_file
from services.gateway.job_records import ChunkRecord, ChunkStats
from services.gateway.postgres_job_store import POSTGRES_DIALECT, PostgresJobStore
from services.gateway.retry_policy import RetryPolicy
from services.gateway.sql_job_store import JobChange, Row
from services.gateway.tenant_chunk_limits import NO_TENANT_CHUNK_LIMITS, TenantChunkLimits
from tests.gateway.gateway_fakes import FakeMedia, ManualClock, job_record, planned_chunks
from tests.gateway.test_postgres_gateways import listeners, wait_for
from tests.gateway.test_postgres_job_store import StoreOpener, database, open_gateway_store
from tests.gateway.test_postgres_leases import waits_on_a_lock
from tests.support.postgres_server import session_postgres

NOW = 100.0
LEASE_ENDS = 1e12
RETRY = RetryPolicy(budget_seconds=120.0, initial_backoff_seconds=1.0, max_backoff_seconds=30.0, max_attempts=5)
# Far past the test's own timeout: only a wake-up can end the wait in time.
LEASE_WAIT_SECONDS = 60.0
PROMPT_SECONDS = 10.0

# The shared fixtures, used by name.
__all__ = ["database", "open_gateway_store"]


@pytest.fixture(scope="module")
def postgres_url(request: pytest.FixtureRequest) -> str:
    return session_postgres(request.config).create_database(request.module.__name__)


def add_batch(store: PostgresJobStore, tenant: str, jobs: int, chunks: int, first_created_at: float) -> None:
    for number in range(jobs):
        job = replace(job_record(f"{tenant}-{number}", first_created_at + number, tenant=tenant), batch_id=tenant)
        store.add_job(job, planned_chunks(job.id, [10] * chunks))


def tenant_of(chunk: ChunkRecord) -> str:
    return chunk.job_id.split("-")[0]


def lease_at_once(gateways: Sequence[PostgresJobStore], limits: TenantChunkLimits, most_each: int) -> dict[str, int]:
    """Each gateway leases from its own thread, all starting together, until it has `most_each` chunks or gets
    none; the chunks leased, by tenant."""
    start_together = threading.Barrier(len(gateways))
    leased: list[ChunkRecord] = []
    failures: list[BaseException] = []

    def lease(gateway: PostgresJobStore) -> None:
        try:
            start_together.wait(timeout=PROMPT_SECONDS)
            for _ in range(most_each):
                chunk = gateway.lease_next_chunk("w", uuid.uuid4().hex, NOW, LEASE_ENDS, limits)
                if chunk is None:
                    return
                leased.append(chunk)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=lease, args=(gateway,)) for gateway in gateways]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures and not any(thread.is_alive() for thread in threads)
    counts: dict[str, int] = {}
    for chunk in leased:
        counts[tenant_of(chunk)] = counts.get(tenant_of(chunk), 0) + 1
    return counts


def test_two_gateways_leasing_at_once_keep_each_tenant_within_its_limit(open_gateway_store: StoreOpener) -> None:
    setup = open_gateway_store()
    add_batch(setup, "acme", jobs=3, chunks=4, first_created_at=1.0)
    add_batch(setup, "beta", jobs=3, chunks=4, first_created_at=10.0)
    gateways = [open_gateway_store(), open_gateway_store()]
    assert lease_at_once(gateways, TenantChunkLimits(2, {"beta": 3}), most_each=24) == {"acme": 2, "beta": 3}


def test_two_gateways_leasing_at_once_share_the_workers_between_tenants(open_gateway_store: StoreOpener) -> None:
    setup = open_gateway_store()
    add_batch(setup, "acme", jobs=2, chunks=5, first_created_at=1.0)
    add_batch(setup, "beta", jobs=1, chunks=5, first_created_at=10.0)
    gateways = [open_gateway_store(), open_gateway_store()]
    assert lease_at_once(gateways, NO_TENANT_CHUNK_LIMITS, most_each=3) == {"acme": 3, "beta": 3}


class PausesAfterChoosing(PostgresJobStore):
    """Holds its lease transaction open, once it has chosen the chunk, until told to go on."""

    def __init__(self, url: str, media_root: Path) -> None:
        super().__init__(url, media_root)
        self.chosen = threading.Event()
        self.go_on = threading.Event()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        rows = super()._rows(sql, params)
        if sql.endswith(POSTGRES_DIALECT.lease_lock):
            self.chosen.set()
            self.go_on.wait(PROMPT_SECONDS)
        return rows


def test_a_lease_waits_for_another_gateways_lease_to_commit_before_counting(
    open_gateway_store: StoreOpener, database: str, tmp_path: Path
) -> None:
    setup = open_gateway_store()
    add_batch(setup, "acme", jobs=1, chunks=2, first_created_at=1.0)
    limits = TenantChunkLimits(1)
    pausing = PausesAfterChoosing(database, tmp_path)
    other = open_gateway_store()
    results: dict[str, ChunkRecord | None] = {}

    def lease(name: str, gateway: PostgresJobStore) -> None:
        results[name] = gateway.lease_next_chunk(name, uuid.uuid4().hex, NOW, LEASE_ENDS, limits)

    try:
        first = threading.Thread(target=lease, args=("first", pausing))
        first.start()
        assert pausing.chosen.wait(PROMPT_SECONDS)
        second = threading.Thread(target=lease, args=("second", other))
        second.start()
        wait_for("the second lease waiting or done", lambda: waits_on_a_lock(database) or not second.is_alive())
        # Held off until the first lease commits: leasing now, it would not count the first one.
        assert second.is_alive()
        pausing.go_on.set()
        first.join(PROMPT_SECONDS)
        second.join(PROMPT_SECONDS)
    finally:
        pausing.go_on.set()
        pausing.close()
    chunk = results["first"]
    assert chunk is not None and chunk.index == 0
    assert results["second"] is None


class SignalsFindingNothing(PostgresJobStore):
    """Says when a lease has looked and found no chunk it may lease (the queue then asks when one comes due)."""

    def __init__(self, url: str, media_root: Path) -> None:
        super().__init__(url, media_root)
        self.found_nothing = threading.Event()

    def next_due_at(self, now: float) -> float | None:
        due = super().next_due_at(now)
        self.found_nothing.set()
        return due


def test_a_lease_held_back_by_its_tenants_limit_is_granted_when_another_gateway_finishes_a_chunk_of_the_tenant(
    open_gateway_store: StoreOpener, database: str, tmp_path: Path
) -> None:
    limits = TenantChunkLimits(1)
    clock = ManualClock()
    finishing = open_gateway_store()
    job = job_record("acme-0", clock(), tenant="acme")
    write_media_file(tmp_path, job.source_image_uri, b"source")
    finishing.add_job(job, planned_chunks(job.id, [10, 10]))
    held = finishing.lease_next_chunk("w1", "held", clock(), LEASE_ENDS, limits)
    assert held is not None

    async def scenario(waiting_store: SignalsFindingNothing) -> ChunkRecord | None:
        queue = ChunkQueue(JobCoordinator(waiting_store, FakeMedia(), tmp_path, RETRY, clock), 30.0, RETRY, 0.0, limits)

        async def heard(change: JobChange) -> None:
            if change.work_added:
                await queue.work_added()

        following = asyncio.create_task(waiting_store.follow_changes(heard))
        try:
            await asyncio.to_thread(wait_for, "listening", lambda: listeners(database) == 1)
            waiting = asyncio.create_task(queue.lease("w2", LEASE_WAIT_SECONDS))
            assert await asyncio.to_thread(waiting_store.found_nothing.wait, PROMPT_SECONDS)
            stats = ChunkStats(10, 0, 0)
            assert await asyncio.to_thread(finishing.finish_chunk, job.id, 0, "held", "segment", stats, clock()) == 1
            lease = await asyncio.wait_for(waiting, PROMPT_SECONDS)
        finally:
            following.cancel()
        return None if lease is None else lease.chunk

    waiting_store = SignalsFindingNothing(database, tmp_path)
    try:
        granted = asyncio.run(scenario(waiting_store))
    finally:
        waiting_store.close()
    assert granted is not None and granted.index == 1

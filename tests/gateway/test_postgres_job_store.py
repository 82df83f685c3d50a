"""What only the PostgreSQL store does: gateways sharing one database (a real server, several connections)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from services.common.errors import Unavailable
from services.gateway.job_records import ChunkRecord, ChunkStats
from services.gateway.job_store import open_job_store
from services.gateway.postgres_job_store import PostgresJobStore
from services.triton.server_process import free_ports
from tests.gateway.gateway_fakes import job_of, job_record, planned_chunks
from tests.support.postgres_server import session_postgres

StoreOpener = Callable[[], PostgresJobStore]


@pytest.fixture(scope="module")
def postgres_url(request: pytest.FixtureRequest) -> str:
    return session_postgres(request.config).create_database(request.module.__name__)


@pytest.fixture
def database(request: pytest.FixtureRequest, postgres_url: str, tmp_path: Path) -> Iterator[str]:
    PostgresJobStore(postgres_url, tmp_path).close()
    session_postgres(request.config).empty_tables(postgres_url)
    yield postgres_url


@pytest.fixture
def open_gateway_store(database: str, tmp_path: Path) -> Iterator[StoreOpener]:
    """Opens stores on the one database, as separate gateways do; all are closed after the test."""
    opened: list[PostgresJobStore] = []

    def open_store() -> PostgresJobStore:
        opened.append(PostgresJobStore(database, tmp_path))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


def _advisory_locks(url: str) -> int:
    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
    assert row is not None
    return int(row[0])


def test_two_gateways_leasing_at_once_never_lease_the_same_chunk(open_gateway_store: StoreOpener) -> None:
    setup = open_gateway_store()
    for number in range(4):
        setup.add_job(job_record(f"j{number}", float(number)), planned_chunks(f"j{number}", [10] * 5))
    gateways = [open_gateway_store(), open_gateway_store()]
    start_together = threading.Barrier(len(gateways))
    leased: list[list[ChunkRecord]] = [[] for _ in gateways]
    failures: list[BaseException] = []

    def lease_until_empty(number: int) -> None:
        try:
            start_together.wait(timeout=10)
            while True:
                lease_id = f"g{number}-{len(leased[number])}"
                chunk = gateways[number].lease_next_chunk(f"w{number}", lease_id, 1.0, 31.0)
                if chunk is None:
                    return
                leased[number].append(chunk)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=lease_until_empty, args=(number,)) for number in range(len(gateways))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures
    everything = sorted((chunk.job_id, chunk.index) for chunks in leased for chunk in chunks)
    assert everything == [(f"j{number}", index) for number in range(4) for index in range(5)]
    for number in range(4):
        chunks = setup.list_chunks(f"j{number}")
        # A chunk leased twice would carry two attempts, and the lease id of only the later one.
        assert [(chunk.state, chunk.attempts) for chunk in chunks] == [("LEASED", 1)] * 5
    assert {chunk.lease_id for chunks in leased for chunk in chunks} == {
        chunk.lease_id for number in range(4) for chunk in setup.list_chunks(f"j{number}")
    }


def test_a_lease_skips_a_chunk_another_gateway_is_leasing(database: str, tmp_path: Path) -> None:
    # A lock wait would fail this test (lock_timeout) instead of hanging it.
    store = PostgresJobStore(f"{database}?options=-c%20lock_timeout%3D2000", tmp_path)
    store.add_job(job_record("a", 1.0), planned_chunks("a", [10, 10]))
    with psycopg.connect(database) as other_gateway:
        other_gateway.execute("SELECT * FROM chunks WHERE job_id = 'a' AND idx = 0 FOR UPDATE")
        chunk = store.lease_next_chunk("w", "l1", 1.0, 31.0)
        assert chunk is not None and (chunk.job_id, chunk.index) == ("a", 1)
    store.close()


def test_a_starting_gateway_leaves_the_leases_of_running_gateways_alone(
    open_gateway_store: StoreOpener,
) -> None:
    running = open_gateway_store()
    running.add_job(job_record("a", 1.0), planned_chunks("a", [10, 10]))
    running.lease_next_chunk("w", "l0", 1.0, 31.0)
    running.record_progress(job_of(running, "l0"), "l0", 40.0, 7, "detect", 3, now=2.0)

    starting = open_gateway_store()
    assert starting.recover_after_restart() == []
    held = starting.chunk_for_lease("l0")
    assert held is not None and held.state == "LEASED" and held.frames_done == 7
    assert starting.count_pending_chunks() == 1
    # Once the lease lapses, any gateway's reaper finds it.
    assert starting.lapsed_leases(now=39.0) == []
    assert [chunk.lease_id for chunk in starting.lapsed_leases(now=41.0)] == ["l0"]


def _move_to_joining(store: PostgresJobStore, job_id: str) -> None:
    store.add_job(job_record(job_id, 1.0), planned_chunks(job_id, [10]))
    store.lease_next_chunk("w", f"{job_id}-lease", 1.0, 31.0)
    assert store.finish_chunk(job_id, 0, f"{job_id}-lease", "segment", ChunkStats(10, 10, 10), now=1.5) == 0
    assert store.transition_job(job_id, ("QUEUED", "RUNNING"), "JOINING", at=2.0)


def test_only_joins_whose_gateway_is_gone_are_resumed_once(open_gateway_store: StoreOpener) -> None:
    joining = open_gateway_store()
    _move_to_joining(joining, "a")
    assert open_gateway_store().recover_after_restart() == []

    joining.close()
    replacement = open_gateway_store()
    assert replacement.recover_after_restart() == ["a"]
    assert open_gateway_store().recover_after_restart() == []


def test_ending_a_job_lets_go_of_its_join_even_when_another_gateway_ended_it(
    open_gateway_store: StoreOpener, database: str
) -> None:
    joining = open_gateway_store()
    _move_to_joining(joining, "a")
    _move_to_joining(joining, "b")
    assert _advisory_locks(database) == 2

    assert joining.transition_job("a", ["JOINING"], "SUCCEEDED", at=3.0)
    assert _advisory_locks(database) == 1
    cancelling = open_gateway_store()
    assert cancelling.transition_job("b", ["QUEUED", "RUNNING", "JOINING"], "CANCELLED", at=3.0)
    assert not joining.transition_job("b", ["JOINING"], "SUCCEEDED", at=4.0)
    assert _advisory_locks(database) == 0


def test_a_job_left_joining_without_a_holder_is_resumed(open_gateway_store: StoreOpener) -> None:
    first = open_gateway_store()
    first.add_job(replace(job_record("a", 1.0), state="JOINING"), [])
    first.add_job(replace(job_record("b", 2.0), state="JOINING"), [])
    assert first.recover_after_restart() == ["a", "b"]
    assert first.recover_after_restart() == []


def test_open_job_store_picks_postgres_by_scheme(database: str, tmp_path: Path) -> None:
    urls = (database, database.replace("postgresql://", "postgresql+psycopg://", 1))
    for number, url in enumerate(urls):
        store = open_job_store(url, tmp_path)
        assert isinstance(store, PostgresJobStore)
        store.add_job(job_record(f"j{number}", 1.0), [])
        assert [job.id for job in store.list_jobs(10)] == [f"j{index}" for index in range(number, -1, -1)]
        store.close()
    assert not (tmp_path / "swapline.db").exists()


def test_an_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="cannot connect to the PostgreSQL job store"):
        PostgresJobStore(
            f"postgresql://postgres@127.0.0.1:{free_ports(1)[0]}/none", tmp_path, connect_timeout_seconds=2
        )


def _wait_for_a_lock_wait(url: str, timeout_seconds: float = 10.0) -> None:
    """Returns once some session of the database waits for a row lock (bounded polling)."""
    deadline = time.monotonic() + timeout_seconds
    with psycopg.connect(url, autocommit=True) as observer:
        while True:
            row = observer.execute(
                """SELECT COUNT(*) FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'"""
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            assert time.monotonic() < deadline, "no session started waiting for a lock"


def test_ending_a_job_during_another_gateways_lease_waits_for_it_without_deadlock(
    database: str, tmp_path: Path
) -> None:
    store = PostgresJobStore(database, tmp_path)
    store.add_job(job_record("a", 1.0), planned_chunks("a", [10, 10]))
    ended: list[bool] = []
    # The lease of another gateway, mid-transaction: chunk locked, its job not yet started.
    with psycopg.connect(f"{database}?options=-c%20lock_timeout%3D3000") as leasing:
        leasing.execute("SELECT * FROM chunks WHERE job_id = 'a' AND idx = 0 FOR UPDATE")
        cancel = threading.Thread(
            target=lambda: ended.append(store.transition_job("a", ("QUEUED", "RUNNING"), "CANCELLED", at=2.0))
        )
        cancel.start()
        _wait_for_a_lock_wait(database)
        # Were the job row already the cancel's, this would wait for it while it waits for the chunk.
        leasing.execute("UPDATE chunks SET state = 'LEASED', lease_id = 'l0' WHERE job_id = 'a' AND idx = 0")
        leasing.execute("UPDATE jobs SET state = 'RUNNING', started_at = 1.5 WHERE id = 'a' AND state = 'QUEUED'")
        leasing.commit()
    cancel.join(timeout=10)
    assert ended == [True]
    job = store.get_job("a")
    assert job is not None and job.state == "CANCELLED" and job.started_at == 1.5
    assert [chunk.state for chunk in store.list_chunks("a")] == ["CANCELLED", "CANCELLED"]
    store.close()


def test_a_lost_connection_is_unavailable_without_its_details_and_the_next_call_reconnects(
    database: str, tmp_path: Path
) -> None:
    store = PostgresJobStore(database, tmp_path)
    store.add_job(job_record("a", 1.0), [])
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(
            """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()"""
        )
    with pytest.raises(Unavailable) as lost:
        store.get_job("a")
    # Callers of the public API get this message: no host, port or statement of the server.
    assert lost.value.message == "the job store is unavailable; try again"
    job = store.get_job("a")
    assert job is not None and job.id == "a"
    store.close()

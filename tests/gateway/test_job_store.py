"""The JobStore semantics, proven the same for SQLite and for PostgreSQL (a real server)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.gateway.job_records import ChunkStats, JobError, JoinOutcome
from services.gateway.job_store import JobStore, SqliteJobStore, open_job_store, sqlite_path
from services.gateway.postgres_job_store import PostgresJobStore
from tests.gateway.gateway_fakes import job_record, planned_chunks
from tests.support.postgres_server import session_postgres


@pytest.fixture(scope="module")
def postgres_url(request: pytest.FixtureRequest) -> str:
    return session_postgres(request.config).create_database(request.module.__name__)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    opened: JobStore
    if request.param == "sqlite":
        opened = SqliteJobStore(tmp_path / "jobs.db")
    else:
        url = request.getfixturevalue("postgres_url")
        opened = PostgresJobStore(url)
        session_postgres(request.config).empty_tables(url)
    yield opened
    opened.close()


def test_job_round_trips_with_its_target_and_chunks(store: JobStore) -> None:
    job = replace(job_record("a", 10.0), chunks_total=2)
    store.add_job(job, planned_chunks("a", [60, 40]))
    loaded = store.get_job("a")
    assert loaded is not None
    assert loaded == replace(job, chunks_done=0, frames_done=0)
    assert [(c.index, c.state, c.start_frame, c.frame_count) for c in store.list_chunks("a")] == [
        (0, "PENDING", 0, 60),
        (1, "PENDING", 60, 40),
    ]
    assert store.get_job("missing") is None


def test_lease_takes_the_oldest_live_job_first_and_starts_it(store: JobStore) -> None:
    store.add_job(job_record("old", 1.0), planned_chunks("old", [10]))
    store.add_job(job_record("new", 2.0), planned_chunks("new", [10]))
    first = store.lease_next_chunk("w1", "lease-1", now=50.0, expires_at=80.0)
    assert first is not None and first.job_id == "old" and first.state == "LEASED"
    assert first.attempts == 1 and first.worker_id == "w1" and first.lease_expires_at == 80.0
    old = store.get_job("old")
    assert old is not None and old.state == "RUNNING" and old.started_at == 50.0
    second = store.lease_next_chunk("w1", "lease-2", now=51.0, expires_at=81.0)
    assert second is not None and second.job_id == "new"
    assert store.lease_next_chunk("w1", "lease-3", now=52.0, expires_at=82.0) is None


def test_progress_counts_leased_frames_and_finishing_reports_all_done(store: JobStore) -> None:
    store.add_job(job_record("a", 1.0), planned_chunks("a", [60, 40]))
    store.lease_next_chunk("w", "l0", 1.0, 31.0)
    store.lease_next_chunk("w", "l1", 1.0, 31.0)
    store.record_progress("l1", 40.0, frames_done=15, stage="swap", faces=15)
    job = store.get_job("a")
    assert job is not None and job.frames_done == 15 and job.chunks_done == 0
    chunk = store.chunk_for_lease("l1")
    assert chunk is not None and chunk.stage == "swap" and chunk.lease_expires_at == 40.0
    assert store.finish_chunk("a", 0, "work/a/chunk-00000.mp4", ChunkStats(60, 60, 60)) is False
    assert store.finish_chunk("a", 1, "work/a/chunk-00001.mp4", ChunkStats(40, 0, 0)) is True
    job = store.get_job("a")
    assert job is not None and job.frames_done == 100 and job.chunks_done == 2
    done = store.list_chunks("a")[1]
    assert done.stats == ChunkStats(40, 0, 0)


def test_transitions_only_from_allowed_states_and_ending_cancels_open_chunks(
    store: JobStore,
) -> None:
    store.add_job(job_record("a", 1.0), planned_chunks("a", [10, 10, 10]))
    store.lease_next_chunk("w", "l0", 1.0, 31.0)
    store.finish_chunk("a", 0, "s0", ChunkStats(10, 10, 10))
    store.lease_next_chunk("w", "l1", 1.0, 31.0)
    assert store.transition_job("a", ["JOINING"], "SUCCEEDED", at=5.0) is False
    error = JobError(13, "boom")
    assert store.transition_job("a", ("QUEUED", "RUNNING"), "FAILED", at=5.0, error=error) is True
    job = store.get_job("a")
    assert job is not None and job.state == "FAILED" and job.error == error and job.finished_at == 5.0
    assert [chunk.state for chunk in store.list_chunks("a")] == ["DONE", "CANCELLED", "CANCELLED"]
    assert store.transition_job("a", ("QUEUED", "RUNNING"), "CANCELLED", at=6.0) is False


def test_join_outcome_and_report_are_stored_with_success(store: JobStore) -> None:
    store.add_job(replace(job_record("a", 1.0), state="JOINING"), [])
    outcome = JoinOutcome("outputs/a/output.mp4", 100, True, 1.5)
    assert store.transition_job("a", ["JOINING"], "SUCCEEDED", at=9.0, join=outcome, report_json='{"ok": true}')
    job = store.get_job("a")
    assert job is not None and job.join == outcome and job.report_json == '{"ok": true}'


def test_a_refused_transition_stores_no_report(store: JobStore) -> None:
    store.add_job(replace(job_record("a", 1.0), state="CANCELLED"), [])
    assert not store.transition_job("a", ["JOINING"], "SUCCEEDED", at=9.0, report_json='{"late": true}')
    job = store.get_job("a")
    assert job is not None and job.state == "CANCELLED" and job.report_json == ""


def test_sqlite_restart_requeues_leased_chunks_and_names_joining_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    before = SqliteJobStore(path)
    before.add_job(job_record("running", 1.0), planned_chunks("running", [10, 10]))
    before.add_job(replace(job_record("joining", 2.0), state="JOINING"), [])
    before.lease_next_chunk("w", "l0", 1.0, 31.0)
    before.record_progress("l0", 31.0, 7, "detect", 3)
    before.close()

    after = SqliteJobStore(path)
    assert after.recover_after_restart() == ["joining"]
    chunks = after.list_chunks("running")
    assert [chunk.state for chunk in chunks] == ["PENDING", "PENDING"]
    assert chunks[0].lease_id == "" and chunks[0].frames_done == 0 and chunks[0].attempts == 1
    assert after.chunk_for_lease("l0") is None
    assert after.count_pending_chunks() == 2


def test_list_is_newest_first_with_limit_and_state_filter(store: JobStore) -> None:
    for number, state in enumerate(["QUEUED", "FAILED", "QUEUED", "SUCCEEDED", "FAILED"]):
        store.add_job(job_record(f"j{number}", float(number), state=state), [])  # type: ignore[arg-type]
    assert [job.id for job in store.list_jobs(10)] == ["j4", "j3", "j2", "j1", "j0"]
    assert [job.id for job in store.list_jobs(2)] == ["j4", "j3"]
    assert [job.id for job in store.list_jobs(10, "FAILED")] == ["j4", "j1"]
    assert store.count_jobs_by_state() == {"QUEUED": 2, "FAILED": 2, "SUCCEEDED": 1}


def test_pending_count_ignores_ended_jobs(store: JobStore) -> None:
    store.add_job(job_record("live", 1.0), planned_chunks("live", [10, 10]))
    store.add_job(job_record("dead", 2.0), planned_chunks("dead", [10]))
    store.transition_job("dead", ["QUEUED"], "CANCELLED", at=3.0)
    assert store.count_pending_chunks() == 2


def test_database_urls(tmp_path: Path) -> None:
    assert sqlite_path("", tmp_path) == tmp_path / "swapline.db"
    assert sqlite_path("sqlite:////var/lib/jobs.db", tmp_path) == Path("/var/lib/jobs.db")
    assert sqlite_path("sqlite:///:memory:", tmp_path) == ":memory:"
    with pytest.raises(InvalidArgument, match="is not a sqlite"):
        sqlite_path("mysql://db", tmp_path)
    with pytest.raises(InvalidArgument, match="is not a sqlite"):
        open_job_store("sqlite://jobs.db", tmp_path)
    opened = open_job_store("", tmp_path / "media")
    assert isinstance(opened, SqliteJobStore)
    assert (tmp_path / "media" / "swapline.db").exists()
    opened.close()
    opened = open_job_store(f"sqlite:///{tmp_path / 'other.db'}", tmp_path)
    assert isinstance(opened, SqliteJobStore) and (tmp_path / "other.db").exists()
    opened.close()


def test_an_unknown_scheme_is_named_without_the_rest_of_the_url(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="scheme 'mysql' is not supported") as refused:
        open_job_store("mysql://admin:hunter2@db/swapline", tmp_path)
    assert "hunter2" not in str(refused.value)

"""SubmitJob's idempotency keys through real gRPC: a retry returns the job the first submission made, a
different request under the same key is refused, racing retries make one job, and keys are per tenant."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from services.gateway.job_store import JobStore
from services.gateway.postgres_job_store import PostgresJobStore
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.gateway.gateway_fakes import job_record
from tests.gateway.test_postgres_gateways import FACE_JPEG, gateways_on
from tests.gateway.test_servicer import Gateway, face_jpeg, run, status_of, submit_messages
from tests.support.postgres_server import session_postgres

__all__ = ["face_jpeg"]  # the module fixture, used by name

KEY = "4f1c2a9e-6b7d-4e2f-9a51-0c3b8d7e6f10"


def upload_spec(source: bytes, key: str = KEY, crf: int = 0) -> jobs_pb2.JobSpec:
    spec = jobs_pb2.JobSpec(source_image=source, target_filename="clip.mp4", idempotency_key=key)
    spec.encode.crf = crf
    return spec


async def submit_upload(jobs: jobs_pb2_grpc.JobServiceStub, spec: jobs_pb2.JobSpec, video: bytes) -> jobs_pb2.Job:
    return await jobs.SubmitJob(iter(submit_messages(spec, [video[:5], video[5:]])))


async def all_jobs(gateway: Gateway) -> list[jobs_pb2.Job]:
    internal = gateway.jobs_as("internal")
    return list((await internal.ListJobs(jobs_pb2.ListJobsRequest(limit=1000))).jobs)


def uploads_of(gateway: Gateway, tenant: str = "local") -> list[Path]:
    root = gateway.media_root / "uploads" if tenant == "local" else gateway.media_root / "tenants" / tenant / "uploads"
    return sorted(root.iterdir()) if root.exists() else []


def test_a_retried_submission_returns_the_same_job_and_makes_no_second(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        first = await submit_upload(gateway.jobs, upload_spec(face_jpeg), b"tenant video")
        again = await submit_upload(gateway.jobs, upload_spec(face_jpeg), b"tenant video")
        assert again.id == first.id
        assert again.state == jobs_pb2.JOB_STATE_QUEUED
        assert [job.id for job in await all_jobs(gateway)] == [first.id]
        # The retry's upload was only hashed, never stored.
        assert [path.name for path in uploads_of(gateway)] == [first.id]
        # A named target too: its URI is what the fingerprint covers.
        (gateway.media_root / "named.mp4").write_bytes(b"video")
        named = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="named.mp4", idempotency_key="named-1")
        jobs = [await gateway.jobs.SubmitJob(iter(submit_messages(named))) for _ in range(3)]
        assert len({job.id for job in jobs}) == 1
        assert len(await all_jobs(gateway)) == 2
        # Without a key, every submission is a new job, as before.
        keyless = upload_spec(face_jpeg, key="")
        unkeyed = [await submit_upload(gateway.jobs, keyless, b"tenant video") for _ in range(2)]
        assert unkeyed[0].id != unkeyed[1].id

    run(tmp_path, scenario)


def test_the_same_key_with_another_request_is_already_exists_naming_the_key(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        first = await submit_upload(gateway.jobs, upload_spec(face_jpeg), b"tenant video")
        # Another spec field, or other target bytes under the same name: both are another request.
        for spec, video in (
            (upload_spec(face_jpeg, crf=30), b"tenant video"),
            (upload_spec(face_jpeg), b"other video"),
        ):
            code, details = await status_of(submit_upload(gateway.jobs, spec, video))
            assert code == grpc.StatusCode.ALREADY_EXISTS, details
            assert KEY in details and first.id in details
        assert [job.id for job in await all_jobs(gateway)] == [first.id]
        assert [path.name for path in uploads_of(gateway)] == [first.id]

    run(tmp_path, scenario)


def test_racing_retries_with_one_key_make_one_job(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = upload_spec(face_jpeg)
        jobs = await asyncio.gather(*(submit_upload(gateway.jobs, spec, b"tenant video") for _ in range(6)))
        assert len({job.id for job in jobs}) == 1
        assert [job.id for job in await all_jobs(gateway)] == [jobs[0].id]
        # The losers' uploads were removed with their would-be jobs.
        assert [path.name for path in uploads_of(gateway)] == [jobs[0].id]

    run(tmp_path, scenario)


def test_keys_are_per_tenant(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        acme, globex = gateway.jobs_as("acme"), gateway.jobs_as("globex")
        acme_job = await submit_upload(acme, upload_spec(face_jpeg), b"acme video")
        # Another tenant's request under the same key is its own job, not a conflict.
        globex_job = await submit_upload(globex, upload_spec(face_jpeg), b"globex video")
        assert acme_job.id != globex_job.id
        assert (await submit_upload(acme, upload_spec(face_jpeg), b"acme video")).id == acme_job.id
        assert (await submit_upload(globex, upload_spec(face_jpeg), b"globex video")).id == globex_job.id
        assert [job.id for job in (await globex.ListJobs(jobs_pb2.ListJobsRequest())).jobs] == [globex_job.id]
        assert len(await all_jobs(gateway)) == 2

    run(tmp_path, scenario)


def test_a_failed_submission_holds_no_key_and_bad_keys_are_invalid(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="later.mp4", idempotency_key="retry-me")
        code, _ = await status_of(gateway.jobs.SubmitJob(iter(submit_messages(spec))))
        assert code == grpc.StatusCode.NOT_FOUND
        (gateway.media_root / "later.mp4").write_bytes(b"video")
        job = await gateway.jobs.SubmitJob(iter(submit_messages(spec)))
        assert job.state == jobs_pb2.JOB_STATE_QUEUED
        for bad, reason in (("k" * 129, "at most 128"), ("tab\tkey", "printable"), (" padded", "printable")):
            code, details = await status_of(submit_upload(gateway.jobs, upload_spec(face_jpeg, key=bad), b"v"))
            assert (code, reason in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details
        longest = await submit_upload(gateway.jobs, upload_spec(face_jpeg, key="k" * 128), b"v")
        assert longest.state == jobs_pb2.JOB_STATE_QUEUED

    run(tmp_path, scenario)


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    return session_postgres(request.config).create_database(request.node.name)


def test_on_postgresql_racing_retries_on_two_gateways_make_one_job(postgres_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with gateways_on(postgres_url, tmp_path, 2) as gateways:
            (gateways[0].media_root / "clip.mp4").write_bytes(b"video")
            spec = jobs_pb2.JobSpec(source_image=FACE_JPEG, target_uri="clip.mp4", idempotency_key=KEY)
            jobs = await asyncio.gather(
                *(gateways[attempt % 2].jobs.SubmitJob(iter(submit_messages(spec))) for attempt in range(6))
            )
            assert len({job.id for job in jobs}) == 1
            listed = await gateways[1].jobs.ListJobs(jobs_pb2.ListJobsRequest())
            assert [job.id for job in listed.jobs] == [jobs[0].id]

    asyncio.run(asyncio.wait_for(scenario(), 60.0))


def test_the_store_keeps_one_job_per_tenant_and_key(tmp_path: Path, postgres_url: str) -> None:
    """The unique index at the store, on both databases: the second insert names the holder, adds nothing."""
    from services.gateway.job_store import SqliteJobStore

    stores: list[JobStore] = [SqliteJobStore(tmp_path / "jobs.db", tmp_path), PostgresJobStore(postgres_url, tmp_path)]
    for store in stores:
        keyed = replace(job_record("a", 1.0), idempotency_key=KEY, payload_fingerprint="f1")
        assert store.add_job(keyed, []) == "a"
        assert store.add_job(replace(keyed, id="b", payload_fingerprint="f2"), []) == "a"
        assert store.add_job(replace(keyed, id="c", tenant="acme"), []) == "c"
        assert store.add_job(job_record("d", 2.0), []) == "d"
        assert store.add_job(job_record("e", 3.0), []) == "e"
        assert sorted(job.id for job in store.list_jobs(10)) == ["a", "c", "d", "e"]
        holder = store.job_with_key("local", KEY)
        assert holder is not None and (holder.id, holder.payload_fingerprint) == ("a", "f1")
        assert store.job_with_key("globex", KEY) is None
        # Retention deleting the job frees its key.
        store.transition_job("a", ["QUEUED"], "CANCELLED", 5.0)
        assert store.delete_ended_jobs(["a"]) == ["a"]
        assert store.job_with_key("local", KEY) is None
        assert store.add_job(replace(keyed, id="f"), []) == "f"
        store.close()

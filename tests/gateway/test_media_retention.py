"""Retention: ended jobs past their age go with their files, interrupted uploads go, and a tenant at its
storage limit is refused with RESOURCE_EXHAUSTED (real files, a real store, the real gRPC gateway)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import grpc
import pytest
from prometheus_client import REGISTRY
from skimage import data as skimage_data

from services.common.settings_loader import SettingsError, load_settings
from services.gateway.job_intake import PARTIAL_UPLOAD_NAME
from services.gateway.job_records import JobRecord, JobState, TenantStorage
from services.gateway.job_store import JobStore, SqliteJobStore
from services.gateway.media_retention import MediaRetention
from services.gateway.postgres_job_store import PostgresJobStore
from services.gateway.retention_policy import RetentionLimits, RetentionPolicy
from services.gateway.settings import ENV_PREFIX, GatewaySettings
from swapline.jobs.v1 import jobs_pb2
from tests.gateway.gateway_fakes import job_record, planned_chunks
from tests.gateway.test_servicer import Gateway, encoded, run, submit_expecting, submit_messages
from tests.support.postgres_server import session_postgres

DAY = 86400.0
HOUR = 3600.0


def policy(
    max_age_seconds: float = 7 * DAY, max_bytes: int = 0, tenants: dict[str, RetentionLimits] | None = None
) -> RetentionPolicy:
    return RetentionPolicy(
        default=RetentionLimits(max_age_seconds, max_bytes),
        tenants=tenants or {},
        interrupted_seconds=HOUR,
        sweep_interval_seconds=300.0,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    opened: JobStore
    if request.param == "sqlite":
        opened = SqliteJobStore(":memory:", tmp_path)
    else:
        opened = PostgresJobStore(session_postgres(request.config).create_database(request.node.name), tmp_path)
    yield opened
    opened.close()


def removed_bytes(kind: str) -> float:
    return REGISTRY.get_sample_value("swapline_gateway_retention_removed_bytes_total", {"kind": kind}) or 0.0


def deleted_jobs(tenant: str) -> float:
    return REGISTRY.get_sample_value("swapline_gateway_retention_jobs_deleted_total", {"tenant": tenant}) or 0.0


def write(path: Path, size: int, modified_at: float | None = None) -> Path:
    """A file of `size` bytes; modified_at also dates the folder holding it (as the last write would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"m" * size)
    if modified_at is not None:
        for dated in (path, path.parent):
            os.utime(dated, (modified_at, modified_at))
    return path


def job_folders(media_root: Path, job: JobRecord) -> dict[str, Path]:
    """Each of the job's folders with one file in it: upload 100 bytes, output 30, work 7."""
    area = media_root if job.tenant == "local" else media_root / "tenants" / job.tenant
    return {
        "uploads": write(area / "uploads" / job.id / "clip.mp4", 100).parent,
        "outputs": write(media_root / "outputs" / job.id / "output.mp4", 30).parent,
        "work": write(media_root / "work" / job.id / "chunk-00000.mp4", 7).parent,
    }


def stored_job(
    store: JobStore, job_id: str, state: JobState, ended_days_ago: float | None, tenant: str = "local"
) -> JobRecord:
    now = time.time()
    job = replace(job_record(job_id, now - 40 * DAY, state=state, tenant=tenant), started_at=now - 40 * DAY)
    if ended_days_ago is not None:
        job = replace(job, finished_at=now - ended_days_ago * DAY)
    store.add_job(job, planned_chunks(job_id, [10]))
    return job


def test_only_ended_jobs_past_their_tenants_age_are_deleted_with_their_files(store: JobStore, tmp_path: Path) -> None:
    jobs = [
        stored_job(store, "old-done", "SUCCEEDED", 8),
        stored_job(store, "old-failed", "FAILED", 8),
        stored_job(store, "old-cancelled", "CANCELLED", 8),
        stored_job(store, "recent-done", "SUCCEEDED", 1),
        # In flight for 40 days: however old, never deleted.
        stored_job(store, "old-running", "RUNNING", None),
        stored_job(store, "old-queued", "QUEUED", None),
        stored_job(store, "old-joining", "JOINING", None),
        # acme keeps ended jobs 30 days.
        stored_job(store, "acme-done", "SUCCEEDED", 8, tenant="acme"),
        stored_job(store, "acme-expired", "FAILED", 31, tenant="acme"),
    ]
    folders = {job.id: job_folders(tmp_path, job) for job in jobs}
    before = {kind: removed_bytes(kind) for kind in ("uploads", "outputs", "work")}
    deleted_before = (deleted_jobs("local"), deleted_jobs("acme"))

    retention = MediaRetention(policy(tenants={"acme": RetentionLimits(30 * DAY, 0)}), store, tmp_path)
    outcome = retention.sweep()

    expired = {"old-done", "old-failed", "old-cancelled", "acme-expired"}
    assert set(outcome.deleted_jobs) == expired
    assert {job.id for job in store.job_summaries()} == {job.id for job in jobs} - expired
    for job in jobs:
        for folder in folders[job.id].values():
            assert folder.exists() == (job.id not in expired), folder
    assert dict(outcome.removed_bytes) == {"uploads": 400, "outputs": 120, "work": 28, "interrupted": 0}
    assert {kind: removed_bytes(kind) - before[kind] for kind in before} == {"uploads": 400, "outputs": 120, "work": 28}
    assert (deleted_jobs("local") - deleted_before[0], deleted_jobs("acme") - deleted_before[1]) == (3, 1)
    # A second sweep, as another gateway's would, finds nothing more to do; it measures what is left.
    again = retention.sweep()
    assert again.deleted_jobs == ()
    assert {(row.tenant, row.used_bytes) for row in again.storage} == {("local", 4 * 137), ("acme", 137)}
    store.add_job(job_record("acme-new", time.time(), tenant="acme"), planned_chunks("acme-new", [10]), 1000)
    assert store.storage_of("acme").used_bytes == 137 + 1000
    # A tenant never measured has used nothing and has the default limit.
    assert store.storage_of("newcomer") == TenantStorage("newcomer", 0, 0)


def test_interrupted_uploads_and_unstored_submissions_go_once_untouched(tmp_path: Path) -> None:
    store = SqliteJobStore(":memory:", tmp_path)
    stored_job(store, "queued", "QUEUED", None)
    two_hours_ago = time.time() - 2 * HOUR
    left_behind = [
        write(tmp_path / "uploads" / "gone1" / PARTIAL_UPLOAD_NAME, 50, two_hours_ago),
        write(tmp_path / "tenants" / "acme" / "uploads" / "gone2" / PARTIAL_UPLOAD_NAME, 60, two_hours_ago),
        # A gateway stopped after storing the images, before storing the job.
        write(tmp_path / "work" / "gone3" / "source-image", 70, two_hours_ago),
    ]
    kept = [
        # Possibly a submission still uploading on some gateway.
        write(tmp_path / "uploads" / "young" / PARTIAL_UPLOAD_NAME, 80),
        # A stored job's folder stays however old.
        write(tmp_path / "work" / "queued" / "source-image", 90, two_hours_ago),
    ]
    before = removed_bytes("interrupted")

    outcome = MediaRetention(policy(), store, tmp_path).sweep()

    assert [path.parent.exists() for path in left_behind] == [False, False, False]
    assert [path.exists() for path in kept] == [True, True]
    assert outcome.removed_bytes["interrupted"] == 180
    assert removed_bytes("interrupted") - before == 180
    assert outcome.deleted_jobs == ()


FACE_JPEG = encoded(cv2.resize(skimage_data.astronaut(), (512, 448)))


def test_a_tenant_at_its_storage_limit_is_refused_with_resource_exhausted(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> None:
        store = gateway.parts.coordinator.store
        # acme's stored media (an upload of its own) is already past its 500 bytes.
        write(gateway.media_root / "tenants" / "acme" / "uploads" / "earlier" / "clip.mp4", 600)
        limits = policy(max_bytes=3000, tenants={"acme": RetentionLimits(7 * DAY, 500)})
        measured = MediaRetention(limits, store, gateway.media_root).sweep()
        assert {(row.tenant, row.used_bytes, row.max_bytes) for row in measured.storage} == {
            ("local", 0, 3000),
            ("acme", 600, 500),
        }

        upload = jobs_pb2.JobSpec(source_image=FACE_JPEG, target_filename="clip.mp4")
        accepted = await gateway.jobs.SubmitJob(iter(submit_messages(upload, [b"v" * 2000])))
        assert accepted.state == jobs_pb2.JOB_STATE_QUEUED
        # The accepted upload counts at once: 2000 + 1500 bytes would pass the limit of 3000.
        refused = await submit_expecting(
            gateway, submit_messages(upload, [b"v" * 1500]), grpc.StatusCode.RESOURCE_EXHAUSTED, "media storage"
        )
        assert not (gateway.media_root / "uploads" / refused.id).exists()

        full = jobs_pb2.JobSpec(source_image=FACE_JPEG, target_uri="earlier/clip.mp4")
        acme = gateway.jobs_as("acme")
        with pytest.raises(grpc.aio.AioRpcError) as refusal:
            await acme.SubmitJob(iter(submit_messages(full)))
        assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "is full (600 of 500 bytes)" in (refusal.value.details() or "")

    run(tmp_path, scenario)


def test_a_malformed_tenant_limit_stops_the_gateway_at_start() -> None:
    required = {
        f"{ENV_PREFIX}MEDIA_ROOT": "/media",
        f"{ENV_PREFIX}DECODER_TARGET": "d:1",
        f"{ENV_PREFIX}DETECTOR_TARGET": "d:2",
        f"{ENV_PREFIX}ENCODER_TARGET": "d:3",
    }
    good = load_settings(GatewaySettings, ENV_PREFIX, {**required, f"{ENV_PREFIX}RETENTION_TENANT_LIMITS": "acme:60:0"})
    assert good.retention_policy().limits_of("acme") == RetentionLimits(60.0, 0)
    with pytest.raises(SettingsError, match=f"{ENV_PREFIX}RETENTION_TENANT_LIMITS entry 'acme:-1:0'"):
        load_settings(GatewaySettings, ENV_PREFIX, {**required, f"{ENV_PREFIX}RETENTION_TENANT_LIMITS": "acme:-1:0"})

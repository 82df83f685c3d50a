"""Batches through the gateway's gRPC API: a job per pair, skipped pairs, targets that fail their own jobs,
aggregate progress, the report, idempotent retries without the uploads, cancellation, tenants, retention."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from services.gateway.job_records import BatchEntry, BatchRecord, JobState
from services.gateway.job_store import SqliteJobStore
from services.gateway.media_retention import MediaRetention
from services.gateway.retention_policy import RetentionLimits, RetentionPolicy
from swapline.chunks.v1 import chunks_pb2
from swapline.jobs.v1 import jobs_pb2
from tests.gateway.gateway_fakes import job_record, planned_chunks
from tests.gateway.test_servicer import (
    FLAT_JPEG,
    Gateway,
    face_jpeg,
    run,
    run_every_chunk,
    status_of,
    stream_status,
    upload_job,
)

__all__ = ["face_jpeg"]  # the module fixture, used by name
KEY = "batch-key-1"
QUEUED_ONLY: tuple[JobState, ...] = ("QUEUED",)
CLIP = b"tenant video"


def batch_messages(
    spec: jobs_pb2.BatchSpec, uploads: Sequence[tuple[int, bytes]] = ()
) -> list[jobs_pb2.SubmitBatchRequest]:
    return [jobs_pb2.SubmitBatchRequest(spec=spec)] + [
        jobs_pb2.SubmitBatchRequest(target_piece=jobs_pb2.BatchTargetPiece(target_index=index, data=data))
        for index, data in uploads
    ]


def two_uploads_and_a_named_target(face: bytes, **fields: object) -> jobs_pb2.BatchSpec:
    """Targets 0 and 1 are uploaded; target 2, named, holds no media. Two sources; pair (1, 1) is skipped."""
    return jobs_pb2.BatchSpec(
        targets=[
            jobs_pb2.BatchTarget(filename="a.mp4", size_bytes=len(CLIP)),
            jobs_pb2.BatchTarget(filename="a.mov", size_bytes=len(CLIP)),
            jobs_pb2.BatchTarget(uri="broken.mp4"),
        ],
        sources=[jobs_pb2.BatchSource(name="hopper", image=face), jobs_pb2.BatchSource(name="astronaut", image=face)],
        skipped=[jobs_pb2.BatchSkip(pair=jobs_pb2.BatchPair(target_index=1, source_index=1), reason="output exists")],
        name="holiday",
        **fields,  # type: ignore[arg-type]
    )


UPLOADS = [(0, CLIP[:5]), (0, CLIP[5:]), (1, CLIP)]


async def batch_jobs(gateway: Gateway, batch_id: str, page_size: int = 2) -> list[jobs_pb2.Job]:
    jobs, token = [], ""
    while True:
        page = await gateway.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(batch_id=batch_id, limit=page_size, page_token=token)
        )
        jobs.extend(page.jobs)
        token = page.next_page_token
        if not token:
            return jobs


def test_a_batch_runs_a_job_per_pair_and_reports_each_outcome(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "broken.mp4").write_bytes(b"garbage, not a video")
        solo = await upload_job(gateway.jobs, face_jpeg)
        batch = await gateway.jobs.SubmitBatch(iter(batch_messages(two_uploads_and_a_named_target(face_jpeg), UPLOADS)))
        assert batch.state == jobs_pb2.BATCH_STATE_RUNNING and batch.name == "holiday"
        assert list(batch.target_names) == ["a.mp4", "a.mov", "broken.mp4"]
        assert list(batch.source_names) == ["hopper", "astronaut"]
        pairs = [(entry.pair.target_index, entry.pair.source_index) for entry in batch.entries]
        assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
        skipped = batch.entries[3]
        assert skipped.skipped and skipped.skip_reason == "output exists" and not skipped.job_id
        counts = batch.counts
        assert (counts.jobs_total, counts.queued, counts.failed, counts.skipped) == (5, 3, 2, 1)
        # Each upload is stored once, under the batch, and its jobs share it.
        jobs = {job.id: job for job in await batch_jobs(gateway, batch.id)}
        assert set(jobs) == {entry.job_id for entry in batch.entries if entry.job_id}
        assert solo.id not in jobs and all(job.batch_id == batch.id for job in jobs.values())
        assert jobs[batch.entries[0].job_id].target_uri == jobs[batch.entries[1].job_id].target_uri
        assert sorted(path.name for path in (gateway.media_root / "uploads" / batch.id).iterdir()) == [
            "00000-a.mp4",
            "00001-a.mov",
        ]
        broken = jobs[batch.entries[4].job_id]
        assert broken.state == jobs_pb2.JOB_STATE_FAILED and "target 2" in broken.error.message
        assert broken.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

        code, details = await status_of(
            gateway.jobs.FetchBatchArtifact(
                jobs_pb2.FetchBatchArtifactRequest(batch_id=batch.id, artifact=jobs_pb2.ARTIFACT_REPORT)
            ).read()
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "RUNNING" in details

        watch = gateway.jobs.WatchBatch(jobs_pb2.WatchBatchRequest(batch_id=batch.id))
        first = await watch.read()
        assert first.state == jobs_pb2.BATCH_STATE_RUNNING and first.counts.jobs_total == 5
        await run_every_chunk(gateway)
        events = [first] + [event async for event in watch]
        last = events[-1]
        assert last.state == jobs_pb2.BATCH_STATE_FAILED
        assert (last.counts.succeeded, last.counts.failed, last.counts.skipped) == (3, 2, 1)
        assert last.frames_done == last.frames_total == 3 * 100 and last.eta_seconds == 0.0
        assert [event.frames_done for event in events] == sorted(event.frames_done for event in events)

        report_bytes, filename, _ = await fetch_batch_artifact(gateway, batch.id, jobs_pb2.ARTIFACT_REPORT)
        report = json.loads(report_bytes)
        assert filename == "batch_report.json" and report["state"] == "FAILED"
        assert report["counts"] == {"jobs": 5, "succeeded": 3, "failed": 2, "cancelled": 0, "skipped": 1}
        assert [row["target"] for row in report["failed"]] == ["broken.mp4", "broken.mp4"]
        assert all("target 2" in row["reason"] for row in report["failed"])
        assert report["skipped"] == [
            {"target": "a.mov", "source": "astronaut", "job_id": "", "state": "SKIPPED", "reason": "output exists"}
        ]
        done = [row for row in report["entries"] if row["state"] == "SUCCEEDED"]
        assert len(done) == 3 and all(row["frames"] == 100 and row["output_uri"] for row in done)
        # Batch jobs are jobs like any other: each has its report, and the advisor's fleet listing (the succeeded
        # jobs) holds them.
        succeeded = await gateway.jobs.ListJobs(jobs_pb2.ListJobsRequest(state=jobs_pb2.JOB_STATE_SUCCEEDED))
        assert {job.id for job in succeeded.jobs} == {row["job_id"] for row in done} | {solo.id}
        assert all(json.loads(job.report_json)["frames"] == 100 for job in succeeded.jobs)
        assert "gpu" in report
        chart, chart_name, _ = await fetch_batch_artifact(gateway, batch.id, jobs_pb2.ARTIFACT_GPU_TREND_CHART)
        assert chart.startswith(b"\x89PNG") and chart_name == "gpu_trend.png"
        code, details = await status_of(
            gateway.jobs.FetchBatchArtifact(
                jobs_pb2.FetchBatchArtifactRequest(batch_id=batch.id, artifact=jobs_pb2.ARTIFACT_OUTPUT)
            ).read()
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "ARTIFACT_REPORT" in details

    run(tmp_path, scenario)


async def fetch_batch_artifact(gateway: Gateway, batch_id: str, artifact: int) -> tuple[bytes, str, int]:
    request = jobs_pb2.FetchBatchArtifactRequest(batch_id=batch_id, artifact=artifact)  # type: ignore[arg-type]
    data, filename, total = b"", "", 0
    async for chunk in gateway.jobs.FetchBatchArtifact(request):
        data += chunk.data
        filename, total = chunk.filename, chunk.total_size
    return data, filename, total


def test_a_retried_batch_is_the_same_batch_and_need_not_upload_again(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "broken.mp4").write_bytes(b"garbage")
        spec = two_uploads_and_a_named_target(face_jpeg, idempotency_key=KEY)
        first = await gateway.jobs.SubmitBatch(iter(batch_messages(spec, UPLOADS)))
        # The spec alone, with other pairs skipped: the same batch, as first submitted.
        resumed = jobs_pb2.BatchSpec()
        resumed.CopyFrom(spec)
        del resumed.skipped[:]
        again = await gateway.jobs.SubmitBatch(iter(batch_messages(resumed)))
        assert again.id == first.id and again.counts.skipped == 1
        racing = await asyncio.gather(
            *(gateway.jobs.SubmitBatch(iter(batch_messages(spec, UPLOADS))) for _ in range(4))
        )
        assert {batch.id for batch in racing} == {first.id}
        changed = jobs_pb2.BatchSpec()
        changed.CopyFrom(spec)
        changed.encode.crf = 30
        code, details = await status_of(gateway.jobs.SubmitBatch(iter(batch_messages(changed, UPLOADS))))
        assert code == grpc.StatusCode.ALREADY_EXISTS and KEY in details and first.id in details
        assert len(await batch_jobs(gateway, "", page_size=50)) == 5
        assert [path.name for path in (gateway.media_root / "uploads").iterdir()] == [first.id]

    run(tmp_path, scenario)


def test_a_malformed_batch_is_refused_and_leaves_nothing(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = two_uploads_and_a_named_target(face_jpeg)
        (gateway.media_root / "broken.mp4").write_bytes(b"garbage")
        no_face = jobs_pb2.BatchSpec()
        no_face.CopyFrom(spec)
        no_face.sources[1].image = FLAT_JPEG
        bad_pair = jobs_pb2.BatchSpec(
            targets=spec.targets, sources=spec.sources, pairs=[jobs_pb2.BatchPair(target_index=3)]
        )
        cases = [
            (batch_messages(spec, [(0, CLIP[:4]), (1, CLIP)]), grpc.StatusCode.INVALID_ARGUMENT, "came while target 0"),
            (batch_messages(spec, [(0, CLIP), (1, CLIP[:3])]), grpc.StatusCode.INVALID_ARGUMENT, "ended after 3"),
            (batch_messages(spec, [*UPLOADS, (1, b"x")]), grpc.StatusCode.INVALID_ARGUMENT, "after every upload"),
            (batch_messages(no_face, UPLOADS), grpc.StatusCode.FAILED_PRECONDITION, "source image 1 ('astronaut')"),
            (batch_messages(bad_pair), grpc.StatusCode.INVALID_ARGUMENT, "pair (3, 0)"),
            (batch_messages(jobs_pb2.BatchSpec(sources=spec.sources)), grpc.StatusCode.INVALID_ARGUMENT, "one target"),
            (
                [jobs_pb2.SubmitBatchRequest(target_piece=jobs_pb2.BatchTargetPiece(data=b"x"))],
                grpc.StatusCode.INVALID_ARGUMENT,
                "first SubmitBatch message",
            ),
        ]
        for messages, code, text in cases:
            status, details = await status_of(gateway.jobs.SubmitBatch(iter(messages)))
            assert status == code and text in details, details
        assert await batch_jobs(gateway, "") == []
        assert not (gateway.media_root / "uploads").exists() or not list((gateway.media_root / "uploads").iterdir())
        assert not (gateway.media_root / "work").exists() or not list((gateway.media_root / "work").iterdir())

    run(tmp_path, scenario)


def test_a_batch_past_the_job_limit_is_refused_before_any_image_is_read(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = jobs_pb2.BatchSpec(
            targets=[jobs_pb2.BatchTarget(uri=f"{index}.mp4") for index in range(2)],
            sources=[jobs_pb2.BatchSource(name=str(index), image=b"not read") for index in range(2)],
        )
        code, details = await status_of(gateway.jobs.SubmitBatch(iter(batch_messages(spec))))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "make 4 jobs; a batch holds at most 3" in details

    run(tmp_path, scenario, max_batch_jobs=3)


def test_a_tenant_sees_and_cancels_only_its_own_batches(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        acme, globex = gateway.jobs_as("acme"), gateway.jobs_as("globex")
        spec = jobs_pb2.BatchSpec(
            targets=[jobs_pb2.BatchTarget(filename="a.mp4", size_bytes=len(CLIP))],
            sources=[jobs_pb2.BatchSource(name="hopper", image=face_jpeg)] * 2,
        )
        batch = await acme.SubmitBatch(iter(batch_messages(spec, [(0, CLIP)])))
        assert (gateway.media_root / "tenants" / "acme" / "uploads" / batch.id / "00000-a.mp4").read_bytes() == CLIP
        for call in (
            globex.GetBatch(jobs_pb2.GetBatchRequest(batch_id=batch.id)),
            globex.CancelBatch(jobs_pb2.CancelBatchRequest(batch_id=batch.id)),
        ):
            code, details = await status_of(call)
            assert code == grpc.StatusCode.NOT_FOUND and batch.id in details
        code, _ = await stream_status(globex.WatchBatch(jobs_pb2.WatchBatchRequest(batch_id=batch.id)))
        assert code == grpc.StatusCode.NOT_FOUND
        assert list((await globex.ListJobs(jobs_pb2.ListJobsRequest(batch_id=batch.id))).jobs) == []

        lease = await gateway.queue.LeaseChunk(chunks_pb2.LeaseChunkRequest(worker_id="w"))
        assert lease.has_lease
        cancelled = await acme.CancelBatch(jobs_pb2.CancelBatchRequest(batch_id=batch.id))
        assert cancelled.state == jobs_pb2.BATCH_STATE_CANCELLED and cancelled.counts.cancelled == 2
        assert all(entry.state == jobs_pb2.JOB_STATE_CANCELLED for entry in cancelled.entries)
        code, details = await status_of(acme.CancelBatch(jobs_pb2.CancelBatchRequest(batch_id=batch.id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already ended (CANCELLED)" in details
        events = [event async for event in acme.WatchBatch(jobs_pb2.WatchBatchRequest(batch_id=batch.id))]
        assert [event.state for event in events] == [jobs_pb2.BATCH_STATE_CANCELLED]

    run(tmp_path, scenario)


def test_retention_deletes_a_batch_with_its_uploads_once_its_jobs_are_gone(tmp_path: Path) -> None:
    day = 86400.0
    now = 100 * day
    store = SqliteJobStore(":memory:", tmp_path)
    for batch_id, ended_at in (("oldbatch", now - 10 * day), ("newbatch", now - 1 * day)):
        job = job_record(f"{batch_id}-job", ended_at - 60)
        batch = BatchRecord(batch_id, job.tenant, "", ended_at - 60, ("a.mp4",), ("s",), (BatchEntry(0, 0, job.id),))
        store.add_batch(batch, [(job, planned_chunks(job.id, [100]))])
        store.transition_job(job.id, QUEUED_ONLY, "SUCCEEDED", ended_at)
        for folder in ("uploads", "outputs"):
            (tmp_path / folder / batch_id).mkdir(parents=True)
            (tmp_path / folder / batch_id / "file").write_bytes(b"x" * 10)
    policy = RetentionPolicy(RetentionLimits(7 * day, 0), {}, 3600.0, 300.0)
    outcome = MediaRetention(policy, store, tmp_path, clock=lambda: now).sweep()
    assert outcome.deleted_jobs == ("oldbatch-job",)
    assert store.get_batch("oldbatch") is None and store.get_batch("newbatch") is not None
    assert not (tmp_path / "uploads" / "oldbatch").exists() and not (tmp_path / "outputs" / "oldbatch").exists()
    assert (tmp_path / "uploads" / "newbatch" / "file").exists()
    assert outcome.removed_bytes["uploads"] == 10 and outcome.removed_bytes["interrupted"] == 0


@pytest.mark.parametrize("page_size", [1, 3])
def test_list_jobs_pages_one_batchs_jobs(tmp_path: Path, face_jpeg: bytes, page_size: int) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = jobs_pb2.BatchSpec(
            targets=[jobs_pb2.BatchTarget(filename="a.mp4", size_bytes=len(CLIP))],
            sources=[jobs_pb2.BatchSource(name=str(index), image=face_jpeg) for index in range(5)],
        )
        batch = await gateway.jobs.SubmitBatch(iter(batch_messages(spec, [(0, CLIP)])))
        other = await gateway.jobs.SubmitBatch(iter(batch_messages(spec, [(0, CLIP)])))
        listed = [job.id for job in await batch_jobs(gateway, batch.id, page_size)]
        assert sorted(listed) == sorted(entry.job_id for entry in batch.entries)
        assert len(set(listed)) == 5 and not set(listed) & {entry.job_id for entry in other.entries}
        first = await gateway.jobs.ListJobs(jobs_pb2.ListJobsRequest(batch_id=batch.id, limit=1))
        code, details = await status_of(
            gateway.jobs.ListJobs(jobs_pb2.ListJobsRequest(batch_id=other.id, page_token=first.next_page_token))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "another filter" in details

    run(tmp_path, scenario)

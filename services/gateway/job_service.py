"""The public job operations: submit (validate, plan, queue), get, list, cancel, watch, artifacts."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument, SwaplineError, code_value
from services.common.face_model_catalog import job_models
from services.common.input_limits import InputLimits, excerpt
from services.common.job_vocabulary import STAGE_NAMES
from services.common.media_paths import existing_media_path, resolve_media_path
from services.common.tenant_context import LOCAL_TENANT
from services.gateway.chunk_planner import output_uri, plan_chunks, report_uri
from services.gateway.chunk_queue import ChunkQueue
from services.gateway.gpu_trend_source import UNKNOWN_GPU_USAGE, CurrentGpuUsage, GpuUsage, NoTrendSource
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_gpu_trend import gpu_trend_chart_uri, gpu_trend_csv_uri
from services.gateway.job_idempotency import RequestFingerprint, checked_idempotency_key, replayed
from services.gateway.job_images import work_area
from services.gateway.job_intake import JobIntake, sanitised_filename
from services.gateway.job_paging import cursor_of
from services.gateway.job_paging import page_token as job_page_token
from services.gateway.job_records import (
    ENDED_JOB_STATES,
    ArtifactKind,
    EncodeOptions,
    JobError,
    JobRecord,
    JobRequest,
    JobState,
)
from services.gateway.media_clients import MediaServices
from services.gateway.sql_job_store import JobChange
from services.gateway.tenant_areas import UPLOADS_FOLDER, checked_tenant, in_tenant_area

DEFAULT_CONCURRENT_IMAGE_CHECKS = 4
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
# Progress events carry GPU usage in these states only: before and after, the GPUs serve other jobs.
RUNNING_JOB_STATES: frozenset[JobState] = frozenset({"RUNNING", "JOINING"})
# A watch sends the job's progress at least this often, changed or not: the client sees the watch is
# alive, and a wake-up missed (another gateway's change while this one's listener reconnected) delays
# an event by no more than this.
WATCH_KEEPALIVE_SECONDS = 10.0


@dataclass(frozen=True)
class JobProgress:
    """One WatchJob event: the job as stored plus what is derived from it at `at`."""

    job: JobRecord
    stage: str
    fps: float
    eta_seconds: float
    at: float
    gpu: GpuUsage = UNKNOWN_GPU_USAGE


@dataclass(frozen=True)
class ArtifactFile:
    path: Path
    filename: str
    size: int


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def current_stage(job: JobRecord, leased_stages: list[str]) -> str:
    """JOINING reports join; otherwise the stage most leased chunks are in (ties: the later stage)."""
    if job.state == "JOINING":
        return "join"
    reported = [stage for stage in leased_stages if stage]
    if not reported:
        return ""
    pipeline_position: dict[str, int] = {stage: position for position, stage in enumerate(STAGE_NAMES)}
    return max(set(reported), key=lambda stage: (reported.count(stage), pipeline_position.get(stage, -1)))


def progress_rates(job: JobRecord, now: float) -> tuple[float, float]:
    """(frames per second since the job started, seconds left at that rate; -1 while unknown)."""
    if job.started_at is None:
        return 0.0, -1.0
    elapsed = (job.finished_at if job.finished_at is not None else now) - job.started_at
    fps = job.frames_done / elapsed if elapsed > 0 else 0.0
    if job.state in ENDED_JOB_STATES:
        return fps, 0.0
    if fps <= 0:
        return fps, -1.0
    return fps, max(job.frames_total - job.frames_done, 0) / fps


class JobService:
    """Every method takes the caller's tenant: a job of another tenant is NOT_FOUND, as a missing one.

    tenant None: an internal caller (a swapline service), who sees every job; its submissions belong to
    the local tenant.
    """

    def __init__(
        self,
        coordinator: JobCoordinator,
        queue: ChunkQueue,
        media: MediaServices,
        media_root: Path,
        chunk_seconds: float,
        max_upload_bytes: int,
        limits: InputLimits,
        new_id: Callable[[], str] = new_job_id,
        gpu_usage: CurrentGpuUsage | None = None,
        max_concurrent_image_checks: int = DEFAULT_CONCURRENT_IMAGE_CHECKS,
        watch_keepalive_seconds: float = WATCH_KEEPALIVE_SECONDS,
    ) -> None:
        self._coordinator = coordinator
        self._store = coordinator.store
        # Shared with the batch service: their image checks take turns together.
        self.intake = JobIntake(
            coordinator.store, media, media_root, max_upload_bytes, limits, max_concurrent_image_checks
        )
        self._queue = queue
        self._media_root = media_root
        self._chunk_seconds = chunk_seconds
        self._new_id = new_id
        self._gpu_usage = gpu_usage or CurrentGpuUsage(NoTrendSource())
        self._watch_keepalive_seconds = watch_keepalive_seconds

    async def submit(self, request: JobRequest, upload: AsyncIterator[bytes], tenant: str | None) -> JobRecord:
        """Validates everything a worker would trip over, then stores the images and queues the chunks.

        A job that fails validation is still recorded, FAILED with the reason, and the call fails with the
        same status; its message carries the job id.

        A request with an idempotency key its tenant's stored job already holds is not validated again: the
        call returns that job if the request is the same (spec and target), else fails ALREADY_EXISTS, and
        records nothing either way. Only an accepted job holds its key, so a submission that failed may be
        retried with the same key.
        """
        owner = LOCAL_TENANT if tenant is None else checked_tenant(tenant)
        key = checked_idempotency_key(request.idempotency_key)
        fingerprint = RequestFingerprint(request)
        if key:
            holder = await self._store.run(self._store.job_with_key, owner, key)
            if holder is not None:
                await self._fingerprint_upload(upload, fingerprint)
                return replayed(holder, key, fingerprint.hexdigest())
        job_id = self._new_id()
        job = JobRecord(
            id=job_id,
            tenant=owner,
            state="QUEUED",
            selector=request.selector,
            # Target and encode settings are set once they passed their checks: a failed job never stores
            # what they refused.
            target_uri="",
            output_uri="",
            source_image_uri="",
            reference_image_uri="",
            encode=EncodeOptions(),
            target=None,
            frames_total=0,
            chunks_total=0,
            created_at=self._coordinator.now(),
        )
        accepted = False
        holder_id = job_id
        try:
            job, uploaded_bytes = await self._validate(job, request, upload, fingerprint)
            chunks = plan_chunks(job_id, job.target, self._chunk_seconds) if job.target else []
            if not chunks:
                raise InvalidArgument(f"target {excerpt(job.target_uri)} has no video frames")
            job = replace(job, frames_total=sum(chunk.frame_count for chunk in chunks), chunks_total=len(chunks))
            job = await self._store_images(job, request)
            # The key goes with the accepted job only: a failed job, recorded below, holds none.
            keyed = replace(job, idempotency_key=key, payload_fingerprint=fingerprint.hexdigest())
            holder_id = await self._store.run(self._store.add_job, keyed, chunks, uploaded_bytes)
            # Another submission with the key was stored first (a concurrent retry): this one's files go.
            accepted = holder_id == job_id
        except SwaplineError as error:
            message = f"job {job_id}: {error.message}"
            failed = replace(
                job,
                state="FAILED",
                finished_at=self._coordinator.now(),
                error=JobError(code_value(error.code), message),
                source_image_uri="",
                reference_image_uri="",
            )
            await self._store.run(self._store.add_job, failed, [])
            await self._coordinator.changed(job_id)
            raise type(error)(message) from error
        finally:
            if not accepted:
                await asyncio.to_thread(self._remove_job_files, owner, job_id)
        if holder_id != job_id:
            return replayed(await self._coordinator.load_job(holder_id), key, fingerprint.hexdigest())
        await self._coordinator.changed(job_id)
        await self._queue.work_added()
        return await self._coordinator.load_job(job_id)

    async def _fingerprint_upload(self, upload: AsyncIterator[bytes], fingerprint: RequestFingerprint) -> None:
        """Reads a retried submission's upload into its fingerprint only: the job already has its target."""
        received = 0
        async for piece in upload:
            received += len(piece)
            if received > self.intake.max_upload_bytes:
                raise InvalidArgument(f"uploaded target exceeds the limit of {self.intake.max_upload_bytes} bytes")
            await asyncio.to_thread(fingerprint.add_upload, piece)

    def _remove_job_files(self, tenant: str, job_id: str) -> None:
        for area in (in_tenant_area(tenant, f"{UPLOADS_FOLDER}/{job_id}"), work_area(job_id)):
            shutil.rmtree(resolve_media_path(self._media_root, area), ignore_errors=True)

    async def _validate(
        self, job: JobRecord, request: JobRequest, upload: AsyncIterator[bytes], fingerprint: RequestFingerprint
    ) -> tuple[JobRecord, int]:
        """The job with its checked target; the bytes uploaded for it (0 for a named target), which are also
        fed to the fingerprint as they stream in."""
        intake = self.intake
        intake.check_target_names(request.target_uri, request.target_filename)
        intake.check_encode(request.encode)
        storage = await intake.storage_with_room(job.tenant)
        job = replace(job, encode=request.encode, models=job_models(request.swapper, request.detector))
        reference = await intake.decoded_reference(request.selector, request.reference_image)
        source = await intake.decoded_image(request.source_image, "source image")
        uploaded_bytes = 0
        if request.target_uri:
            if await anext(upload, None) is not None:
                raise InvalidArgument("the spec names a target_uri and also uploads a target; send one of them")
            job = replace(job, target_uri=request.target_uri)
            target_uri = await intake.named_target(job.tenant, request.target_uri)
        elif request.target_filename:
            target_uri = in_tenant_area(
                job.tenant, f"{UPLOADS_FOLDER}/{job.id}/{sanitised_filename(request.target_filename)}"
            )
            uploaded_bytes = await intake.receive_upload(
                job.tenant, target_uri, upload, storage, fingerprint.add_upload
            )
        else:
            raise InvalidArgument("the spec needs a target_uri, or a target_filename followed by the uploaded target")
        job = replace(job, target_uri=target_uri)
        target = await intake.probed_target(target_uri, request.target_uri or request.target_filename)
        job = replace(job, target=target, output_uri=output_uri(job.id, target.kind))
        await intake.require_face(source, "source image")
        if reference is not None:
            await intake.require_face(reference, "reference image")
        return job, uploaded_bytes

    async def _store_images(self, job: JobRecord, request: JobRequest) -> JobRecord:
        reference = request.reference_image if request.selector == "reference" else b""
        source_uri, reference_uri = await self.intake.store_images(job.id, request.source_image, reference)
        return replace(job, source_image_uri=source_uri, reference_image_uri=reference_uri)

    async def get(self, job_id: str, tenant: str | None) -> JobRecord:
        return await self._coordinator.load_job(job_id, tenant)

    async def list(
        self, limit: int, state: JobState | None, tenant: str | None, page_token: str = "", batch_id: str = ""
    ) -> tuple[list[JobRecord], str]:
        """A page of the jobs (of the batch, when given), newest first (job_paging.py), and the token of the
        next page ("" if none). A batch of another tenant lists nothing, as one that does not exist."""
        bounded = DEFAULT_LIST_LIMIT if limit <= 0 else min(limit, MAX_LIST_LIMIT)
        after = cursor_of(page_token, state, tenant, batch_id)
        jobs, last = await self._store.run(self._store.list_jobs_page, bounded, state, tenant, after, batch_id)
        return jobs, "" if last is None else job_page_token(last, state, tenant, batch_id)

    async def cancel(self, job_id: str, tenant: str | None) -> JobRecord:
        job = await self._coordinator.cancel_job(job_id, tenant)
        # Its leased chunks no longer count against its tenant's limit: leases held back by it look again.
        await self._queue.work_added()
        return job

    async def progress(self, job_id: str, tenant: str | None) -> JobProgress:
        return await self._store.run(self._read_progress, job_id, tenant)

    def _read_progress(self, job_id: str, tenant: str | None) -> JobProgress:
        job = self._coordinator.require_job(job_id, tenant)
        leased = [chunk.stage for chunk in self._store.list_chunks(job_id) if chunk.state == "LEASED"]
        now = self._coordinator.now()
        fps, eta = progress_rates(job, now)
        return JobProgress(job=job, stage=current_stage(job, leased), fps=fps, eta_seconds=eta, at=now)

    async def _progress_with_gpu(self, job_id: str, tenant: str | None) -> JobProgress:
        """While chunks run or segments join, the event also carries the GPUs' current usage."""
        progress = await self.progress(job_id, tenant)
        if progress.job.state not in RUNNING_JOB_STATES:
            return progress
        return replace(progress, gpu=await self._gpu_usage.read())

    async def watch(self, job_id: str, tenant: str | None) -> AsyncIterator[JobProgress]:
        """The current state at once, then an event per change, ending after the terminal state.

        Changes made through any gateway wake the watch (follow_other_gateways hears the others). However
        quiet the job, an event read afresh from the store comes at least every keepalive, so no wait is
        unbounded: the client gets progress or the end, and a job deleted meanwhile ends the watch with
        NOT_FOUND.
        """
        loop = asyncio.get_running_loop()
        with self._coordinator.feed.watching(job_id) as changes:
            progress = await self._progress_with_gpu(job_id, tenant)
            yield progress
            sent_at = loop.time()
            while progress.job.state not in ENDED_JOB_STATES:
                keepalive_at = sent_at + self._watch_keepalive_seconds
                await changes.changed_within(keepalive_at - loop.time())
                latest = await self._progress_with_gpu(job_id, tenant)
                if _same_state(latest, progress) and loop.time() < keepalive_at:
                    continue
                progress = latest
                yield progress
                sent_at = loop.time()

    async def follow_other_gateways(self) -> None:
        """Runs beside the server: wakes this gateway's watches for the changes other gateways make, and
        its waiting leases for the work they add."""
        await self._store.follow_changes(self._heard)

    async def _heard(self, change: JobChange) -> None:
        await self._coordinator.feed.notify(change.job_id)
        if change.work_added:
            await self._queue.work_added()

    async def artifact(self, job_id: str, kind: ArtifactKind, tenant: str | None) -> ArtifactFile:
        """The output exists once the job SUCCEEDED; the report and GPU trend once it ended at all."""
        job = await self._coordinator.load_job(job_id, tenant)
        if kind == "output" and job.state != "SUCCEEDED":
            raise FailedPrecondition(f"job {job_id} is {job.state}; its output exists once it has SUCCEEDED")
        if job.state not in ENDED_JOB_STATES:
            raise FailedPrecondition(f"job {job_id} is {job.state}; its {kind} exists once it has ended")
        uris: dict[ArtifactKind, str] = {
            "output": job.join.output_uri if job.join else job.output_uri,
            "report": report_uri(job_id),
            "gpu_trend_chart": gpu_trend_chart_uri(job_id),
            "gpu_trend_csv": gpu_trend_csv_uri(job_id),
        }
        if kind in ("gpu_trend_chart", "gpu_trend_csv") and job.started_at is None:
            raise FailedPrecondition(f"job {job_id} ended before it started; it has no GPU trend")
        return await asyncio.to_thread(artifact_file, self._media_root, uris[kind])


def _same_state(latest: JobProgress, sent: JobProgress) -> bool:
    """Nothing a client would see has changed but the clock (rates, time, GPU usage follow from it)."""
    return latest.job == sent.job and latest.stage == sent.stage


def artifact_file(media_root: Path, uri: str) -> ArtifactFile:
    path = existing_media_path(media_root, uri)
    return ArtifactFile(path=path, filename=path.name, size=path.stat().st_size)

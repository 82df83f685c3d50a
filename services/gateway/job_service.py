"""The public job operations: submit (validate, plan, queue), get, list, cancel, watch, artifacts."""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument, SwaplineError, code_value
from services.common.image_codec import decode_rgb_image
from services.common.job_vocabulary import STAGE_NAMES
from services.common.media_info import MediaInfo
from services.common.media_paths import existing_media_path, resolve_media_path, writable_media_path
from services.gateway.chunk_planner import output_uri, plan_chunks, report_uri
from services.gateway.chunk_queue import ChunkQueue
from services.gateway.gpu_trend_source import UNKNOWN_GPU_USAGE, CurrentGpuUsage, GpuUsage, NoTrendSource
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_gpu_trend import gpu_trend_chart_uri, gpu_trend_csv_uri
from services.gateway.job_records import (
    ENDED_JOB_STATES,
    ArtifactKind,
    JobError,
    JobRecord,
    JobRequest,
    JobState,
)
from services.gateway.media_clients import MediaServices

DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
# Progress events carry GPU usage in these states only: before and after, the GPUs serve other jobs.
RUNNING_JOB_STATES: frozenset[JobState] = frozenset({"RUNNING", "JOINING"})
_UNSAFE_FILENAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


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


def sanitised_filename(name: str) -> str:
    """The upload's base name, reduced to characters that are safe in any path; never empty or hidden."""
    base = _UNSAFE_FILENAME_CHARACTERS.sub("_", Path(name.replace("\\", "/")).name).lstrip(".")
    return base or "target"


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
    def __init__(
        self,
        coordinator: JobCoordinator,
        queue: ChunkQueue,
        media: MediaServices,
        media_root: Path,
        chunk_seconds: float,
        max_upload_bytes: int,
        new_id: Callable[[], str] = new_job_id,
        gpu_usage: CurrentGpuUsage | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._store = coordinator.store
        self._queue = queue
        self._media = media
        self._media_root = media_root
        self._chunk_seconds = chunk_seconds
        self._max_upload_bytes = max_upload_bytes
        self._new_id = new_id
        self._gpu_usage = gpu_usage or CurrentGpuUsage(NoTrendSource())

    async def submit(self, request: JobRequest, upload: AsyncIterator[bytes]) -> JobRecord:
        """Validates everything a worker would trip over, then queues the chunks.

        A job that fails validation is still recorded, FAILED with the reason, and the call fails with the
        same status; its message carries the job id.
        """
        job_id = self._new_id()
        job = JobRecord(
            id=job_id,
            state="QUEUED",
            selector=request.selector,
            target_uri=request.target_uri,
            output_uri="",
            source_image=request.source_image,
            reference_image=request.reference_image,
            encode=request.encode,
            target=None,
            frames_total=0,
            chunks_total=0,
            created_at=self._coordinator.now(),
        )
        accepted = False
        try:
            job = await self._validate(job, request, upload)
            chunks = plan_chunks(job_id, job.target, self._chunk_seconds) if job.target else []
            if not chunks:
                raise InvalidArgument(f"target {job.target_uri!r} has no video frames")
            job = replace(
                job, frames_total=sum(chunk.frame_count for chunk in chunks), chunks_total=len(chunks)
            )
            self._store.add_job(job, chunks)
            accepted = True
        except SwaplineError as error:
            message = f"job {job_id}: {error.message}"
            failed = replace(
                job,
                state="FAILED",
                finished_at=self._coordinator.now(),
                error=JobError(code_value(error.code), message),
            )
            self._store.add_job(failed, [])
            await self._coordinator.changed(job_id)
            raise type(error)(message) from error
        finally:
            if not accepted:
                shutil.rmtree(resolve_media_path(self._media_root, f"uploads/{job_id}"), ignore_errors=True)
        await self._coordinator.changed(job_id)
        await self._queue.work_added()
        return self._coordinator.require_job(job_id)

    async def _validate(self, job: JobRecord, request: JobRequest, upload: AsyncIterator[bytes]) -> JobRecord:
        source = decode_rgb_image(request.source_image, "source image")
        reference = None
        if request.selector == "reference":
            if not request.reference_image:
                raise InvalidArgument(
                    "selector REFERENCE needs a reference_image holding the face to replace"
                )
            reference = decode_rgb_image(request.reference_image, "reference image")
        if request.target_uri:
            if await anext(upload, None) is not None:
                raise InvalidArgument(
                    "the spec names a target_uri and also uploads a target; send one of them"
                )
            target_uri = request.target_uri
        elif request.target_filename:
            target_uri = await self._receive_upload(job.id, request.target_filename, upload)
        else:
            raise InvalidArgument(
                "the spec needs a target_uri, or a target_filename followed by the uploaded target"
            )
        job = replace(job, target_uri=target_uri)
        target = await self._media.probe(target_uri)
        job = replace(job, target=target, output_uri=output_uri(job.id, target.kind))
        self._check_target(target_uri, target)
        if await self._media.count_faces(source) == 0:
            raise FailedPrecondition("no face found in the source image")
        if reference is not None and await self._media.count_faces(reference) == 0:
            raise FailedPrecondition("no face found in the reference image")
        return job

    @staticmethod
    def _check_target(target_uri: str, target: MediaInfo) -> None:
        if target.width <= 0 or target.height <= 0:
            raise InvalidArgument(
                f"target {target_uri!r} has no picture size ({target.width}x{target.height})"
            )
        if target.kind == "video" and target.frame_count <= 0:
            raise InvalidArgument(f"target {target_uri!r} has no video frames")

    async def _receive_upload(self, job_id: str, filename: str, upload: AsyncIterator[bytes]) -> str:
        """Streams the upload to disk as it arrives, so a large target never sits in memory."""
        uri = f"uploads/{job_id}/{sanitised_filename(filename)}"
        received = 0
        with writable_media_path(self._media_root, uri).open("wb") as file:
            async for piece in upload:
                received += len(piece)
                if received > self._max_upload_bytes:
                    raise InvalidArgument(
                        f"uploaded target exceeds the limit of {self._max_upload_bytes} bytes"
                    )
                file.write(piece)
        if received == 0:
            raise InvalidArgument("uploaded target is empty")
        return uri

    def get(self, job_id: str) -> JobRecord:
        return self._coordinator.require_job(job_id)

    def list(self, limit: int, state: JobState | None) -> list[JobRecord]:
        bounded = DEFAULT_LIST_LIMIT if limit <= 0 else min(limit, MAX_LIST_LIMIT)
        return self._store.list_jobs(bounded, state)

    async def cancel(self, job_id: str) -> JobRecord:
        return await self._coordinator.cancel_job(job_id)

    def progress(self, job_id: str) -> JobProgress:
        job = self._coordinator.require_job(job_id)
        leased = [chunk.stage for chunk in self._store.list_chunks(job_id) if chunk.state == "LEASED"]
        now = self._coordinator.now()
        fps, eta = progress_rates(job, now)
        return JobProgress(job=job, stage=current_stage(job, leased), fps=fps, eta_seconds=eta, at=now)

    async def _progress_with_gpu(self, job_id: str) -> JobProgress:
        """While chunks run or segments join, the event also carries the GPUs' current usage."""
        progress = self.progress(job_id)
        if progress.job.state not in RUNNING_JOB_STATES:
            return progress
        return replace(progress, gpu=await self._gpu_usage.read())

    async def watch(self, job_id: str) -> AsyncIterator[JobProgress]:
        """The current state at once, then one event per change, ending after the terminal state."""
        feed = self._coordinator.feed
        seen = feed.version(job_id)
        progress = await self._progress_with_gpu(job_id)
        yield progress
        while progress.job.state not in ENDED_JOB_STATES:
            seen = await feed.wait_past(job_id, seen)
            progress = await self._progress_with_gpu(job_id)
            yield progress

    def artifact(self, job_id: str, kind: ArtifactKind) -> ArtifactFile:
        """The output exists once the job SUCCEEDED; the report and GPU trend once it ended at all."""
        job = self._coordinator.require_job(job_id)
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
        path = existing_media_path(self._media_root, uris[kind])
        return ArtifactFile(path=path, filename=path.name, size=path.stat().st_size)

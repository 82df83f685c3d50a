"""Batches: many jobs submitted at once (each target with each source, or as paired), followed, cancelled and
reported as one.

A batch is its jobs: each is an ordinary job (leased, retried, joined, reported and advised like any other),
marked with the batch's id so the scheduler runs interactive jobs first. The batch row holds only what
was fixed at submission (names, pairs, skipped pairs); its state and progress are read from its jobs.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, SwaplineError, code_value
from services.common.face_model_catalog import job_models
from services.common.input_limits import check_text, excerpt
from services.common.media_info import MediaInfo
from services.common.tenant_context import LOCAL_TENANT
from services.gateway.batch_progress import BatchProgress, batch_progress
from services.gateway.batch_report import batch_report_uri, build_batch_report
from services.gateway.chunk_planner import output_uri, plan_chunks
from services.gateway.chunk_queue import ChunkQueue
from services.gateway.job_coordinator import JobCoordinator
from services.gateway.job_gpu_trend import JobTrendRecorder, gpu_trend_chart_uri, gpu_trend_csv_uri
from services.gateway.job_idempotency import batch_fingerprint, checked_idempotency_key, replayed_batch
from services.gateway.job_images import work_area, write_media_file
from services.gateway.job_intake import JobIntake, sanitised_filename
from services.gateway.job_records import (
    ENDED_JOB_STATES,
    UNFINISHED_JOB_STATES,
    ArtifactKind,
    BatchEntry,
    BatchPair,
    BatchRecord,
    BatchRequest,
    JobError,
    JobRecord,
    PlannedChunk,
    TenantStorage,
)
from services.gateway.job_report import report_json, with_gpu_trend
from services.gateway.job_service import WATCH_KEEPALIVE_SECONDS, ArtifactFile, artifact_file, new_job_id
from services.gateway.tenant_areas import UPLOADS_FOLDER, checked_tenant, in_tenant_area

DEFAULT_MAX_BATCH_JOBS = 10_000
MAX_BATCH_NAME_LENGTH = 256
MAX_SKIP_REASON_LENGTH = 1000
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# (target_index, bytes) of each uploaded piece, as they follow the spec.
TargetPieces = AsyncIterator[tuple[int, bytes]]


@dataclass(frozen=True)
class _Target:
    """A batch target once received: its media-root URI and probe, or why its jobs fail."""

    uri: str
    info: MediaInfo | None
    error: SwaplineError | None


def batch_upload_area(tenant: str, batch_id: str) -> str:
    """The batch's uploads, shared by its jobs; retention removes it with the batch."""
    return in_tenant_area(tenant, f"{UPLOADS_FOLDER}/{batch_id}")


class BatchService:
    """As JobService: every method takes the caller's tenant (None: internal), and another tenant's batch is
    NOT_FOUND like a missing one."""

    def __init__(
        self,
        coordinator: JobCoordinator,
        queue: ChunkQueue,
        intake: JobIntake,
        media_root: Path,
        chunk_seconds: float,
        trend_recorder: JobTrendRecorder,
        max_batch_jobs: int = DEFAULT_MAX_BATCH_JOBS,
        new_id: Callable[[], str] = new_job_id,
        watch_keepalive_seconds: float = WATCH_KEEPALIVE_SECONDS,
    ) -> None:
        self._coordinator = coordinator
        self._store = coordinator.store
        self._queue = queue
        self._intake = intake
        self._media_root = media_root
        self._chunk_seconds = chunk_seconds
        self._trend_recorder = trend_recorder
        self._max_batch_jobs = max_batch_jobs
        self._new_id = new_id
        self._watch_keepalive_seconds = watch_keepalive_seconds

    async def submit(self, request: BatchRequest, pieces: TargetPieces, tenant: str | None) -> BatchProgress:
        """Checks the spec, the sources and every target, then stores the batch with all its jobs at once.

        A problem of the spec or of a source fails the call and stores nothing. A target that cannot be used
        (no video, over a limit, missing) fails its own jobs, recorded FAILED with the reason, and the rest
        of the batch runs. As SubmitJob, a key the tenant's stored batch already holds returns that batch if
        the spec is the same, else ALREADY_EXISTS.
        """
        owner = LOCAL_TENANT if tenant is None else checked_tenant(tenant)
        key = checked_idempotency_key(request.idempotency_key)
        pairs = self._checked_pairs(request)
        fingerprint = batch_fingerprint(request)
        if key:
            holder = await self._store.run(self._store.batch_with_key, owner, key)
            if holder is not None:
                await _drain(pieces, sum(target.size_bytes for target in request.targets))
                return await self._progress(replayed_batch(holder, key, fingerprint))
        batch_id = self._new_id()
        job_ids: list[str] = []
        accepted = False
        try:
            batch, jobs, uploaded = await self._prepared(batch_id, owner, request, pairs, pieces, job_ids)
            batch = replace(batch, idempotency_key=key, payload_fingerprint=fingerprint)
            holder_id = await self._store.run(self._store.add_batch, batch, jobs, uploaded)
            accepted = holder_id == batch_id
        finally:
            if not accepted:
                await asyncio.to_thread(self._remove_files, owner, batch_id, job_ids)
        if not accepted:
            return await self._progress(replayed_batch(await self._load(holder_id), key, fingerprint))
        for job_id in job_ids:
            await self._coordinator.feed.notify(job_id)
        await self._coordinator.refresh_counts()
        await self._queue.work_added()
        return await self._progress(batch)

    def _checked_pairs(self, request: BatchRequest) -> list[BatchPair]:
        """The spec's structure, checked before any image or upload is read: counts, names, pair indices."""
        limit = self._max_batch_jobs
        if not request.targets or not request.sources:
            raise InvalidArgument("a batch needs at least one target and one source")
        if len(request.targets) > limit or len(request.sources) > limit:
            raise InvalidArgument(
                f"the batch has {len(request.targets)} targets and {len(request.sources)} sources; "
                f"each may number at most {limit}"
            )
        if not request.pairs and len(request.targets) * len(request.sources) > limit:
            raise InvalidArgument(
                f"{len(request.targets)} targets times {len(request.sources)} sources make "
                f"{len(request.targets) * len(request.sources)} jobs; a batch holds at most {limit}"
            )
        if len(request.pairs) > limit:
            raise InvalidArgument(f"the batch pairs {len(request.pairs)} jobs; a batch holds at most {limit}")
        check_text("batch name", request.name, MAX_BATCH_NAME_LENGTH)
        for index, target in enumerate(request.targets):
            self._intake.check_target_names(target.uri, target.filename)
            if bool(target.uri) == bool(target.filename):
                raise InvalidArgument(f"target {index} must name a uri or a filename to upload, not both or neither")
            if target.filename and not 0 < target.size_bytes <= self._intake.max_upload_bytes:
                raise InvalidArgument(
                    f"target {index} ({excerpt(target.filename)}) declares {target.size_bytes} bytes; an upload "
                    f"holds 1 to {self._intake.max_upload_bytes}"
                )
        for index, source in enumerate(request.sources):
            check_text(f"name of source {index}", source.name, self._intake.limits.max_filename_length)
        pairs = list(request.all_pairs())
        for pair in pairs:
            if not (0 <= pair.target_index < len(request.targets) and 0 <= pair.source_index < len(request.sources)):
                raise InvalidArgument(
                    f"pair ({pair.target_index}, {pair.source_index}) names a target or source the spec lacks "
                    f"({len(request.targets)} targets, {len(request.sources)} sources)"
                )
        if len(set(pairs)) != len(pairs):
            raise InvalidArgument("the batch pairs a target with a source more than once")
        known = set(pairs)
        for pair, reason in request.skipped:
            if pair not in known:
                raise InvalidArgument(
                    f"skipped pair ({pair.target_index}, {pair.source_index}) is not a pair of the batch"
                )
            check_text("skip reason", reason, MAX_SKIP_REASON_LENGTH)
        return pairs

    async def _prepared(
        self,
        batch_id: str,
        owner: str,
        request: BatchRequest,
        pairs: Sequence[BatchPair],
        pieces: TargetPieces,
        job_ids: list[str],
    ) -> tuple[BatchRecord, list[tuple[JobRecord, list[PlannedChunk]]], int]:
        """The batch and its jobs, ready to store, and the bytes uploaded; job_ids collects the jobs whose
        images were written, for the caller to remove should the batch not be stored."""
        intake = self._intake
        intake.check_encode(request.encode)
        models = job_models(request.swapper, request.detector)
        storage = await intake.storage_with_room(owner)
        reference = await intake.decoded_reference(request.selector, request.reference_image)
        if reference is not None:
            await intake.require_face(reference, "reference image")
        reference_image = request.reference_image if reference is not None else b""
        for index, source in enumerate(request.sources):
            what = f"source image {index} ({excerpt(source.name)})"
            await intake.require_face(await intake.decoded_image(source.image, what), what)
        targets, uploaded = await self._received_targets(owner, batch_id, request, pieces, storage)
        skipped = dict(request.skipped)
        now = self._coordinator.now()
        entries: list[BatchEntry] = []
        jobs: list[tuple[JobRecord, list[PlannedChunk]]] = []
        for pair in pairs:
            if pair in skipped:
                entries.append(BatchEntry(pair.target_index, pair.source_index, skip_reason=skipped[pair]))
                continue
            job_id = self._new_id()
            job = JobRecord(
                id=job_id,
                tenant=owner,
                state="QUEUED",
                selector=request.selector,
                target_uri=targets[pair.target_index].uri,
                output_uri="",
                source_image_uri="",
                reference_image_uri="",
                encode=request.encode,
                target=targets[pair.target_index].info,
                frames_total=0,
                chunks_total=0,
                created_at=now,
                models=models,
                batch_id=batch_id,
            )
            job, chunks = await self._planned(job, targets[pair.target_index], request, pair, reference_image, now)
            if chunks:
                job_ids.append(job_id)
            jobs.append((job, chunks))
            entries.append(BatchEntry(pair.target_index, pair.source_index, job_id=job_id))
        batch = BatchRecord(
            id=batch_id,
            tenant=owner,
            name=request.name,
            created_at=now,
            target_names=tuple(target.named for target in request.targets),
            source_names=tuple(source.name for source in request.sources),
            entries=tuple(entries),
        )
        return batch, jobs, uploaded

    async def _planned(
        self,
        job: JobRecord,
        target: _Target,
        request: BatchRequest,
        pair: BatchPair,
        reference_image: bytes,
        now: float,
    ) -> tuple[JobRecord, list[PlannedChunk]]:
        """The job with its chunks and stored images; FAILED without chunks when its target cannot be used."""
        named = request.targets[pair.target_index].named
        if target.error is None and target.info is not None:
            chunks = plan_chunks(job.id, target.info, self._chunk_seconds)
            if chunks:
                source_uri, reference_uri = await self._intake.store_images(
                    job.id, request.sources[pair.source_index].image, reference_image
                )
                return (
                    replace(
                        job,
                        output_uri=output_uri(job.id, target.info.kind),
                        source_image_uri=source_uri,
                        reference_image_uri=reference_uri,
                        frames_total=sum(chunk.frame_count for chunk in chunks),
                        chunks_total=len(chunks),
                    ),
                    chunks,
                )
        error = target.error or InvalidArgument(f"target {excerpt(named)} has no video frames")
        failure = JobError(code_value(error.code), f"job {job.id}: target {pair.target_index}: {error.message}")
        return replace(job, state="FAILED", finished_at=now, error=failure), []

    async def _received_targets(
        self, owner: str, batch_id: str, request: BatchRequest, pieces: TargetPieces, storage: TenantStorage
    ) -> tuple[list[_Target], int]:
        """Each target named or uploaded (uploads stream to disk in the spec's order), then probed. The bytes
        uploaded; the tenant's storage limit counts them as they come."""
        intake = self._intake
        stream = aiter(pieces)
        uploaded = 0
        targets: list[_Target] = []
        for index, target in enumerate(request.targets):
            uri = ""
            if target.filename:
                uri = f"{batch_upload_area(owner, batch_id)}/{index:05d}-{sanitised_filename(target.filename)}"
                size = await intake.receive_upload(
                    owner,
                    uri,
                    _pieces_of(index, target.size_bytes, stream),
                    replace(storage, used_bytes=storage.used_bytes + uploaded),
                    max_bytes=target.size_bytes,
                )
                if size != target.size_bytes:
                    raise InvalidArgument(
                        f"the upload of target {index} ended after {size} of the {target.size_bytes} bytes its "
                        "spec declares"
                    )
                uploaded += size
            try:
                if target.uri:
                    uri = await intake.named_target(owner, target.uri)
                targets.append(_Target(uri, await intake.probed_target(uri, target.named), None))
            except SwaplineError as error:
                targets.append(_Target(uri, None, error))
        if await anext(stream, None) is not None:
            raise InvalidArgument("a target piece came after every upload the spec declares was whole")
        return targets, uploaded

    def _remove_files(self, tenant: str, batch_id: str, job_ids: Iterable[str]) -> None:
        for area in (batch_upload_area(tenant, batch_id), *(work_area(job_id) for job_id in job_ids)):
            shutil.rmtree(self._media_root / area, ignore_errors=True)

    def _require_batch(self, batch_id: str, tenant: str | None) -> BatchRecord:
        batch = self._store.get_batch(batch_id) if _BATCH_ID.fullmatch(batch_id) else None
        if batch is None or (tenant is not None and batch.tenant != tenant):
            raise NotFound(f"batch {excerpt(batch_id)} does not exist")
        return batch

    async def _load(self, batch_id: str, tenant: str | None = None) -> BatchRecord:
        return await self._store.run(self._require_batch, batch_id, tenant)

    def _read_progress(self, batch: BatchRecord) -> BatchProgress:
        return batch_progress(batch, self._store.batch_jobs(batch.id), self._coordinator.now())

    async def _progress(self, batch: BatchRecord) -> BatchProgress:
        return await self._store.run(self._read_progress, batch)

    async def get(self, batch_id: str, tenant: str | None) -> BatchProgress:
        return await self._store.run(lambda: self._read_progress(self._require_batch(batch_id, tenant)))

    async def watch(self, batch_id: str, tenant: str | None) -> AsyncIterator[BatchProgress]:
        """The current progress at once, then an event whenever a job of the batch changes (heard as a job's
        watch hears it), at least every keepalive, ending after the batch has ended."""
        loop = asyncio.get_running_loop()
        batch = await self._load(batch_id, tenant)
        with self._coordinator.feed.watching(*batch.job_ids) as changes:
            progress = await self.get(batch_id, tenant)
            yield progress
            sent_at = loop.time()
            while progress.state == "RUNNING":
                keepalive_at = sent_at + self._watch_keepalive_seconds
                await changes.changed_within(keepalive_at - loop.time())
                latest = await self.get(batch_id, tenant)
                if latest.jobs == progress.jobs and loop.time() < keepalive_at:
                    continue
                progress = latest
                yield progress
                sent_at = loop.time()

    async def cancel(self, batch_id: str, tenant: str | None) -> BatchProgress:
        """Cancels every job of the batch that has not ended; the ended ones keep their outcome."""
        progress = await self.get(batch_id, tenant)
        if progress.state != "RUNNING":
            raise FailedPrecondition(
                f"batch {batch_id} has already ended ({progress.state}); only a running batch can be cancelled"
            )
        await self._store.run(self._store.mark_batch_cancelled, batch_id, self._coordinator.now())
        error = JobError(code_value(grpc.StatusCode.CANCELLED), f"batch {batch_id} was cancelled")
        for job in progress.jobs.values():
            if job.state not in ENDED_JOB_STATES:
                await self._coordinator.end_job(job.id, UNFINISHED_JOB_STATES, "CANCELLED", error=error)
        # Its leased chunks no longer count against its tenant's limit: leases held back by it look again.
        await self._queue.work_added()
        return await self.get(batch_id, tenant)

    async def artifact(self, batch_id: str, kind: ArtifactKind, tenant: str | None) -> ArtifactFile:
        """The report and GPU trend of an ended batch, made at the first request and kept beside its outputs."""
        progress = await self.get(batch_id, tenant)
        if progress.state == "RUNNING":
            raise FailedPrecondition(f"batch {batch_id} is RUNNING; its {kind} exists once every job has ended")
        if kind == "output":
            raise InvalidArgument("a batch has no output of its own; fetch each job's (ListJobs with its batch_id)")
        if kind != "report" and progress.started_at is None:
            raise FailedPrecondition(f"batch {batch_id} ended before any of its jobs started; it has no GPU trend")
        report_uri = batch_report_uri(batch_id)
        if not await asyncio.to_thread((self._media_root / report_uri).is_file):
            await self._write_report(progress)
        uris: dict[ArtifactKind, str] = {
            "report": report_uri,
            "gpu_trend_chart": gpu_trend_chart_uri(batch_id),
            "gpu_trend_csv": gpu_trend_csv_uri(batch_id),
        }
        return await asyncio.to_thread(artifact_file, self._media_root, uris[kind])

    async def _write_report(self, progress: BatchProgress) -> None:
        report = build_batch_report(progress)
        if progress.started_at is not None and progress.finished_at is not None:
            trend = await self._trend_recorder.record(
                progress.batch.id, progress.started_at, progress.finished_at, [], f"batch {progress.batch.id}"
            )
            report = with_gpu_trend(report, trend.section, trend.warnings)
        text = report_json(report)
        await asyncio.to_thread(write_media_file, self._media_root, batch_report_uri(progress.batch.id), text.encode())


async def _pieces_of(index: int, size_bytes: int, stream: AsyncIterator[tuple[int, bytes]]) -> AsyncIterator[bytes]:
    """The pieces of target `index`'s upload, until its declared size has come (or the stream ends)."""
    received = 0
    while received < size_bytes:
        piece = await anext(stream, None)
        if piece is None:
            return
        piece_index, data = piece
        if piece_index != index:
            raise InvalidArgument(
                f"a piece of target {piece_index} came while target {index} still had "
                f"{size_bytes - received} bytes to upload: send each upload whole, in the spec's order"
            )
        received += len(data)
        yield data


async def _drain(pieces: TargetPieces, max_bytes: int) -> None:
    """Reads a retried submission's uploads and drops them: the batch already has its targets."""
    received = 0
    async for _, data in pieces:
        received += len(data)
        if received > max_bytes:
            raise InvalidArgument(f"the uploads run past the {max_bytes} bytes the spec's targets declare")

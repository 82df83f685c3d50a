"""Job lifecycle after submission: joining finished chunks, failing, cancelling, reporting.

Every store call of an async method runs on the store's own thread (`store.run`), so a query waiting in
the database never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from prometheus_client import Gauge

from services.common.errors import RETRYABLE_CODES, FailedPrecondition, NotFound, SwaplineError, code_value
from services.common.input_limits import excerpt
from services.common.media_paths import existing_media_path, resolve_media_path
from services.gateway.chunk_planner import report_uri
from services.gateway.gpu_trend_source import NoTrendSource
from services.gateway.job_change_feed import JobChangeFeed
from services.gateway.job_gpu_trend import JobTrendRecorder
from services.gateway.job_images import work_area, write_media_file
from services.gateway.job_recommendation import JobAdvisor, NoAdvisor
from services.gateway.job_records import (
    CHUNK_STATES,
    ENDED_JOB_STATES,
    JOB_STATES,
    JOINING_ONLY,
    LIVE_JOB_STATES,
    OPEN_CHUNK_STATES,
    UNFINISHED_JOB_STATES,
    ChunkState,
    JobError,
    JobRecord,
    JobState,
    JoinOutcome,
)
from services.gateway.job_report import build_report, report_json, with_gpu_trend, with_recommendation
from services.gateway.job_store import JobStore
from services.gateway.media_clients import MediaServices
from services.gateway.retry_policy import RetryPolicy

log = logging.getLogger(__name__)

# Both gauges count the whole store, which gateway replicas share: every replica reports the same counts,
# so queries take the max across replicas, never the sum (the chart's swapline.openChunksQuery).
JOBS_BY_STATE = Gauge("swapline_gateway_jobs", "Jobs in the shared job store, by state.", ["state"])
# The workers' autoscaling signal: the open backlog. Leased chunks count as well as pending ones, so that
# the workers holding them are not scaled in.
CHUNKS_OPEN = Gauge(
    "swapline_gateway_chunks_open",
    "Open chunks of live jobs in the shared job store, by state: PENDING (waiting for a worker) and LEASED "
    "(held by one).",
    ["state"],
)
OPEN_CHUNK_STATE_LABELS: tuple[ChunkState, ...] = tuple(state for state in CHUNK_STATES if state in OPEN_CHUNK_STATES)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# The ids this gateway hands out are 16 hex digits; anything unlike an id is looked up nowhere.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class StoreCounts:
    jobs_by_state: Mapping[JobState, int]
    open_chunks_by_state: Mapping[ChunkState, int]


class JobCoordinator:
    def __init__(
        self,
        store: JobStore,
        media: MediaServices,
        media_root: Path,
        retry: RetryPolicy,
        clock: Clock = time.time,
        trend_recorder: JobTrendRecorder | None = None,
        advisor: JobAdvisor | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """retry: how failed joins are tried again; sleep waits between them (tests advance a clock)."""
        self.store = store
        self.feed = JobChangeFeed()
        self.media_root = media_root
        self._media = media
        self._retry = retry
        self._clock = clock
        self._sleep = sleep
        self._trend_recorder = trend_recorder or JobTrendRecorder(NoTrendSource(), "none", media_root)
        self._advisor = advisor or NoAdvisor()
        self._joins: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return self._clock()

    def _read_counts(self) -> StoreCounts:
        return StoreCounts(self.store.count_jobs_by_state(), self.store.count_open_chunks_by_state())

    @staticmethod
    def _publish(counts: StoreCounts) -> None:
        for job_state in JOB_STATES:
            JOBS_BY_STATE.labels(job_state).set(counts.jobs_by_state.get(job_state, 0))
        for chunk_state in OPEN_CHUNK_STATE_LABELS:
            CHUNKS_OPEN.labels(chunk_state).set(counts.open_chunks_by_state.get(chunk_state, 0))

    def publish_counts(self) -> None:
        """Sets the gauges from the store, blocking: only while the gateway is assembled, before it serves."""
        self._publish(self._read_counts())

    async def refresh_counts(self) -> None:
        """Sets the gauges from the store, read on the store's thread while the event loop goes on serving."""
        self._publish(await self.store.run(self._read_counts))

    async def refresh_counts_forever(self, interval_seconds: float) -> None:
        """Refreshes the gauges every interval: the other gateways' changes to the shared store (a lease
        granted by another replica, a job submitted there) reach this replica's gauges too."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.refresh_counts()
            except Exception:
                log.exception("refreshing the job and open-chunk gauges from the store failed")

    async def changed(self, job_id: str) -> None:
        await self.refresh_counts()
        await self.feed.notify(job_id)

    def require_job(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job, as the tenant may see it: another tenant's job is NOT_FOUND like a missing one. Blocking:
        async code calls load_job, or runs this inside its own `store.run`.

        tenant None: an internal caller, who sees every job.
        """
        job = self.store.get_job(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None or (tenant is not None and job.tenant != tenant):
            raise NotFound(f"job {excerpt(job_id)} does not exist")
        return job

    async def load_job(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """require_job, read on the store's thread."""
        return await self.store.run(self.require_job, job_id, tenant)

    async def chunks_finished(self, job_id: str) -> None:
        """Every chunk is DONE: the job joins in the background so the last CompleteChunk returns at once."""
        if await self.store.run(self.store.transition_job, job_id, tuple(LIVE_JOB_STATES), "JOINING", self.now()):
            await self.changed(job_id)
            self.start_join(job_id)

    def start_join(self, job_id: str) -> None:
        task = asyncio.create_task(self.join(job_id), name=f"join-{job_id}")
        self._joins.add(task)
        task.add_done_callback(self._joins.discard)

    async def resume_joins(self, job_ids: Iterable[str]) -> None:
        """Joins again what a previous gateway process left JOINING."""
        for job_id in job_ids:
            self.start_join(job_id)
        await self.wait_for_joins()

    async def wait_for_joins(self) -> None:
        while self._joins:
            await asyncio.gather(*list(self._joins), return_exceptions=True)

    async def join(self, job_id: str) -> None:
        """Joins the segments; a retryable failure (the encoder restarting) is tried again with backoff
        while the retry budget lasts, counted from the first failure."""
        job = await self.load_job(job_id)
        chunks = await self.store.run(self.store.list_chunks, job_id)
        failing_since: float | None = None
        failures = 0
        while True:
            try:
                outcome = await self._join_once(job, [chunk.segment_uri for chunk in chunks])
                break
            except SwaplineError as error:
                if error.code not in RETRYABLE_CODES:
                    await self.fail_job(job_id, JobError(code_value(error.code), f"joining segments failed: {error}"))
                    return
                now = self.now()
                failing_since = now if failing_since is None else failing_since
                failures += 1
                retry_at = self._retry.retry_at(failing_since, failures, failures, now)
                if retry_at is None:
                    message = (
                        f"joining segments failed {failures} times in {now - failing_since:.0f} s: {error.message}"
                    )
                    await self.fail_job(job_id, JobError(code_value(error.code), message))
                    return
                log.warning("joining job %s failed (%s); trying again in %.1f s", job_id, error, retry_at - now)
                await self._sleep(retry_at - now)
                if (await self.load_job(job_id)).state != "JOINING":
                    return
            except Exception:
                # Our bug: the details (paths among them) go to the log, not to the client.
                log.exception("joining job %s failed", job_id)
                message = "joining segments failed: internal error (see the gateway's log)"
                await self.fail_job(job_id, JobError(code_value(grpc.StatusCode.INTERNAL), message))
                return
        if outcome.frames != job.frames_total:
            message = f"the joined output holds {outcome.frames} frames, not the job's {job.frames_total}"
            await self.fail_job(job_id, JobError(code_value(grpc.StatusCode.DATA_LOSS), message))
            return
        if await self.end_job(job_id, JOINING_ONLY, "SUCCEEDED", join=outcome):
            await asyncio.to_thread(
                shutil.rmtree, resolve_media_path(self.media_root, work_area(job_id)), ignore_errors=True
            )

    async def _join_once(self, job: JobRecord, segment_uris: list[str]) -> JoinOutcome:
        if job.target is not None and job.target.kind == "image":
            return await self._copy_single_image(job.output_uri, segment_uris[0])
        audio_source = job.target_uri if job.target is not None and job.target.has_audio else ""
        return await self._media.join(segment_uris, audio_source, job.output_uri, job.frames_total)

    async def _copy_single_image(self, output_uri: str, segment_uri: str) -> JoinOutcome:
        """An image job has one segment, already the output picture: there is nothing to join or mux."""
        started = time.perf_counter()

        def copy() -> None:
            picture = existing_media_path(self.media_root, segment_uri).read_bytes()
            write_media_file(self.media_root, output_uri, picture)

        await asyncio.to_thread(copy)
        return JoinOutcome(output_uri, 1, False, time.perf_counter() - started)

    async def fail_job(self, job_id: str, error: JobError) -> bool:
        """Fails a job that has not ended; its open chunks are CANCELLED. Other jobs are untouched."""
        failed = await self.end_job(job_id, UNFINISHED_JOB_STATES, "FAILED", error=error)
        if failed:
            log.info("job %s failed: %s", job_id, error.message)
        return failed

    async def cancel_job(self, job_id: str, tenant: str | None = None) -> JobRecord:
        job = await self.load_job(job_id, tenant)
        if job.state in ENDED_JOB_STATES or not await self.end_job(
            job_id,
            UNFINISHED_JOB_STATES,
            "CANCELLED",
            error=JobError(code_value(grpc.StatusCode.CANCELLED), f"job {job_id} was cancelled"),
        ):
            state = (await self.load_job(job_id)).state
            raise FailedPrecondition(f"job {job_id} has already ended ({state}); only a running job can be cancelled")
        return await self.load_job(job_id)

    async def end_job(
        self,
        job_id: str,
        from_states: Collection[JobState],
        to_state: JobState,
        error: JobError | None = None,
        join: JoinOutcome | None = None,
    ) -> bool:
        """Ends a job with its report: rendered first, stored with the state change, then announced."""
        job = await self.load_job(job_id)
        at = self.now()
        ended = replace(job, state=to_state, finished_at=at, error=error or job.error, join=join or job.join)
        text = await self.render_report(ended)
        if not await self.store.run(
            self.store.transition_job, job_id, from_states, to_state, at, error=error, join=join, report_json=text
        ):
            return False
        if text is not None:
            try:
                await asyncio.to_thread(write_media_file, self.media_root, report_uri(job_id), text.encode())
            except OSError as error_writing:
                log.warning("could not write the report of job %s: %s", job_id, error_writing)
        await self.changed(job_id)
        return True

    async def render_report(self, job: JobRecord) -> str | None:
        """The report of an ended job, with the GPU trend of a job that got to run; None before a probe."""
        if job.target is None:
            return None
        report = build_report(job, await self.store.run(self.store.list_chunks, job.id))
        if job.started_at is not None and job.finished_at is not None:
            trend = await self._trend_recorder.record(job.id, job.started_at, job.finished_at, report["events"])
            report = with_gpu_trend(report, trend.section, trend.warnings)
        if job.state == "SUCCEEDED":
            section, warnings = await self._advisor.recommend(report)
            report = with_recommendation(report, section, warnings)
        return report_json(report)

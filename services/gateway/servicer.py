"""JobService over gRPC: proto in, domain call on behalf of the caller's tenant, proto out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument
from services.common.job_vocabulary import selector_mode_from_proto, selector_mode_to_proto
from services.common.tenant_context import current_caller
from services.gateway.job_records import (
    ArtifactKind,
    EncodeOptions,
    JobRecord,
    JobRequest,
    JobState,
)
from services.gateway.job_service import JobProgress, JobService
from services.gateway.tenant_areas import checked_tenant, tenant_view
from swapline.common.v1 import common_pb2
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc

ARTIFACT_CHUNK_BYTES = 1024 * 1024

JOB_STATE_TO_PROTO: dict[JobState, int] = {
    "QUEUED": jobs_pb2.JOB_STATE_QUEUED,
    "RUNNING": jobs_pb2.JOB_STATE_RUNNING,
    "JOINING": jobs_pb2.JOB_STATE_JOINING,
    "SUCCEEDED": jobs_pb2.JOB_STATE_SUCCEEDED,
    "FAILED": jobs_pb2.JOB_STATE_FAILED,
    "CANCELLED": jobs_pb2.JOB_STATE_CANCELLED,
}
JOB_STATE_FROM_PROTO: dict[int, JobState] = {value: state for state, value in JOB_STATE_TO_PROTO.items()}

ARTIFACT_FROM_PROTO: dict[int, ArtifactKind] = {
    jobs_pb2.ARTIFACT_OUTPUT: "output",
    jobs_pb2.ARTIFACT_REPORT: "report",
    jobs_pb2.ARTIFACT_GPU_TREND_CHART: "gpu_trend_chart",
    jobs_pb2.ARTIFACT_GPU_TREND_CSV: "gpu_trend_csv",
}


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def caller_tenant() -> str | None:
    """The tenant the authentication interceptor set for this call; None for internal callers (all jobs)."""
    caller = current_caller()
    return None if caller.internal else checked_tenant(caller.tenant)


def request_from_proto(spec: jobs_pb2.JobSpec) -> JobRequest:
    return JobRequest(
        source_image=spec.source_image,
        target_uri=spec.target_uri,
        target_filename=spec.target_filename,
        selector=selector_mode_from_proto(spec.selector),
        reference_image=spec.reference_image,
        encode=EncodeOptions(crf=spec.encode.crf, preset=spec.encode.preset),
        swapper=spec.swapper,
        detector=spec.detector,
        idempotency_key=spec.idempotency_key,
    )


def job_to_proto(job: JobRecord) -> jobs_pb2.Job:
    message = jobs_pb2.Job(
        id=job.id,
        state=JOB_STATE_TO_PROTO[job.state],  # type: ignore[arg-type]
        target_uri=tenant_view(job.tenant, job.target_uri),
        output_uri=job.join.output_uri if job.join else job.output_uri,
        selector=selector_mode_to_proto(job.selector),
        frames_total=job.frames_total,
        frames_done=job.frames_done,
        chunks_total=job.chunks_total,
        chunks_done=job.chunks_done,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        report_json=job.report_json,
        swapper=job.models.swapper,
        detector=job.models.detector,
        batch_id=job.batch_id,
    )
    if job.error is not None:
        message.error.CopyFrom(common_pb2.ErrorStatus(code=job.error.code, message=job.error.message))
    return message


def event_to_proto(progress: JobProgress) -> jobs_pb2.JobEvent:
    job = progress.job
    message = jobs_pb2.JobEvent(
        job_id=job.id,
        state=JOB_STATE_TO_PROTO[job.state],  # type: ignore[arg-type]
        stage=progress.stage,
        frames_done=job.frames_done,
        frames_total=job.frames_total,
        fps=progress.fps,
        eta_seconds=progress.eta_seconds,
        chunks_done=job.chunks_done,
        chunks_total=job.chunks_total,
        message=job.error.message if job.error else "",
        at=timestamp(progress.at),
        gpu_utilization_percent=progress.gpu.utilization_percent,
        gpu_memory_used_bytes=progress.gpu.memory_used_bytes,
    )
    if job.error is not None:
        message.error.CopyFrom(common_pb2.ErrorStatus(code=job.error.code, message=job.error.message))
    return message


async def _uploaded_pieces(messages: AsyncIterator[jobs_pb2.SubmitJobRequest]) -> AsyncIterator[bytes]:
    async for message in messages:
        if message.WhichOneof("payload") != "target_chunk":
            raise InvalidArgument("only target_chunk messages may follow the spec")
        yield message.target_chunk


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    async def SubmitJob(
        self, request_iterator: AsyncIterator[jobs_pb2.SubmitJobRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "spec":
            raise InvalidArgument("the first SubmitJob message must carry the spec")
        job = await self._jobs.submit(request_from_proto(first.spec), _uploaded_pieces(messages), caller_tenant())
        return job_to_proto(job)

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return job_to_proto(await self._jobs.get(request.job_id, caller_tenant()))

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        async for progress in self._jobs.watch(request.job_id, caller_tenant()):
            yield event_to_proto(progress)

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return job_to_proto(await self._jobs.cancel(request.job_id, caller_tenant()))

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        state = JOB_STATE_FROM_PROTO.get(request.state) if request.state else None
        if request.state and state is None:
            raise InvalidArgument(f"unknown job state {request.state}")
        jobs, next_page_token = await self._jobs.list(
            request.limit, state, caller_tenant(), request.page_token, request.batch_id
        )
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(job) for job in jobs], next_page_token=next_page_token)

    async def FetchArtifact(
        self, request: jobs_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.ArtifactChunk]:
        kind = ARTIFACT_FROM_PROTO.get(request.artifact)
        if kind is None:
            names = ", ".join(jobs_pb2.Artifact.Name(value) for value in ARTIFACT_FROM_PROTO)
            raise InvalidArgument(f"artifact must be one of {names}")
        artifact = await self._jobs.artifact(request.job_id, kind, caller_tenant())
        file = await asyncio.to_thread(artifact.path.open, "rb")
        try:
            sent = 0
            while True:
                piece = await asyncio.to_thread(file.read, ARTIFACT_CHUNK_BYTES)
                sent += len(piece)
                yield jobs_pb2.ArtifactChunk(data=piece, filename=artifact.filename, total_size=artifact.size)
                if not piece or sent >= artifact.size:
                    return
        finally:
            await asyncio.to_thread(file.close)

"""Job messages of the JobService API to domain records and back."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
from services.gateway.job_service import JobProgress
from services.gateway.tenant_areas import checked_tenant, tenant_view
from swapline.common.v1 import common_pb2
from swapline.encoder.v1 import encoder_pb2
from swapline.jobs.v1 import jobs_pb2

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


def encode_options_from_proto(settings: encoder_pb2.EncodeSettings) -> EncodeOptions:
    return EncodeOptions(crf=settings.crf, preset=settings.preset)


def request_from_proto(spec: jobs_pb2.JobSpec) -> JobRequest:
    return JobRequest(
        source_image=spec.source_image,
        target_uri=spec.target_uri,
        target_filename=spec.target_filename,
        selector=selector_mode_from_proto(spec.selector),
        reference_image=spec.reference_image,
        encode=encode_options_from_proto(spec.encode),
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


async def uploaded_pieces(messages: AsyncIterator[jobs_pb2.SubmitJobRequest]) -> AsyncIterator[bytes]:
    async for message in messages:
        if message.WhichOneof("payload") != "target_chunk":
            raise InvalidArgument("only target_chunk messages may follow the spec")
        yield message.target_chunk

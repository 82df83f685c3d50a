"""JobService over gRPC: proto in, domain call on behalf of the caller's tenant, proto out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from services.common.errors import InvalidArgument
from services.gateway.batch_messages import (
    batch_event_to_proto,
    batch_request_from_proto,
    batch_to_proto,
    target_pieces,
)
from services.gateway.batch_service import BatchService
from services.gateway.job_messages import (
    ARTIFACT_FROM_PROTO,
    JOB_STATE_FROM_PROTO,
    caller_tenant,
    event_to_proto,
    job_to_proto,
    request_from_proto,
    uploaded_pieces,
)
from services.gateway.job_records import ArtifactKind
from services.gateway.job_service import ArtifactFile, JobService
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc

ARTIFACT_CHUNK_BYTES = 1024 * 1024
BATCH_ARTIFACTS: frozenset[ArtifactKind] = frozenset({"report", "gpu_trend_chart", "gpu_trend_csv"})


def artifact_kind(artifact: int, allowed: frozenset[ArtifactKind]) -> ArtifactKind:
    kind = ARTIFACT_FROM_PROTO.get(artifact)
    if kind is None or kind not in allowed:
        names = ", ".join(
            jobs_pb2.Artifact.Name(value) for value, name in ARTIFACT_FROM_PROTO.items() if name in allowed
        )
        raise InvalidArgument(f"artifact must be one of {names}")
    return kind


async def streamed(artifact: ArtifactFile) -> AsyncIterator[jobs_pb2.ArtifactChunk]:
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


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: JobService, batches: BatchService) -> None:
        self._jobs = jobs
        self._batches = batches

    async def SubmitJob(
        self, request_iterator: AsyncIterator[jobs_pb2.SubmitJobRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "spec":
            raise InvalidArgument("the first SubmitJob message must carry the spec")
        job = await self._jobs.submit(request_from_proto(first.spec), uploaded_pieces(messages), caller_tenant())
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
        kind = artifact_kind(request.artifact, frozenset(ARTIFACT_FROM_PROTO.values()))
        async for chunk in streamed(await self._jobs.artifact(request.job_id, kind, caller_tenant())):
            yield chunk

    async def SubmitBatch(
        self, request_iterator: AsyncIterator[jobs_pb2.SubmitBatchRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Batch:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "spec":
            raise InvalidArgument("the first SubmitBatch message must carry the batch spec")
        progress = await self._batches.submit(
            batch_request_from_proto(first.spec), target_pieces(messages), caller_tenant()
        )
        return batch_to_proto(progress)

    async def GetBatch(self, request: jobs_pb2.GetBatchRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Batch:
        return batch_to_proto(await self._batches.get(request.batch_id, caller_tenant()))

    async def WatchBatch(
        self, request: jobs_pb2.WatchBatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.BatchEvent]:
        async for progress in self._batches.watch(request.batch_id, caller_tenant()):
            yield batch_event_to_proto(progress)

    async def CancelBatch(
        self, request: jobs_pb2.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Batch:
        return batch_to_proto(await self._batches.cancel(request.batch_id, caller_tenant()))

    async def FetchBatchArtifact(
        self, request: jobs_pb2.FetchBatchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.ArtifactChunk]:
        kind = artifact_kind(request.artifact, BATCH_ARTIFACTS)
        async for chunk in streamed(await self._batches.artifact(request.batch_id, kind, caller_tenant())):
            yield chunk

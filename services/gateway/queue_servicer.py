"""ChunkQueueService over gRPC, for workers: proto in, chunk queue call, proto out."""

from __future__ import annotations

import grpc

from services.common.job_vocabulary import selector_mode_to_proto
from services.gateway.chunk_queue import ChunkLease, ChunkQueue
from services.gateway.job_records import ChunkStats, FaceCountChange, JobError
from swapline.chunks.v1 import chunks_pb2, chunks_pb2_grpc
from swapline.encoder.v1 import encoder_pb2


def lease_to_proto(lease: ChunkLease) -> chunks_pb2.ChunkLease:
    job, chunk = lease.job, lease.chunk
    target = job.target
    return chunks_pb2.ChunkLease(
        lease_id=lease.lease_id,
        job_id=job.id,
        chunk_index=chunk.index,
        target_uri=job.target_uri,
        start_frame=chunk.start_frame,
        seek_pts=chunk.seek_pts,
        frame_count=chunk.frame_count,
        fps=target.fps if target else 0.0,
        width=target.width if target else 0,
        height=target.height if target else 0,
        source_image=lease.source_image,
        selector=selector_mode_to_proto(job.selector),
        reference_image=lease.reference_image,
        encode=encoder_pb2.EncodeSettings(crf=job.encode.crf, preset=job.encode.preset),
        segment_uri=lease.segment_uri,
        lease_seconds=lease.lease_seconds,
        attempt=chunk.attempts,
        swapper=job.models.swapper,
        detector=job.models.detector,
    )


def stats_from_proto(stats: chunks_pb2.ChunkStats) -> ChunkStats:
    return ChunkStats(
        frames=stats.frames,
        faces=stats.faces,
        frames_with_faces=stats.frames_with_faces,
        stage_seconds=dict(stats.stage_seconds),
        face_count_changes=tuple(
            FaceCountChange(frame_index=change.frame_index, faces=change.faces) for change in stats.face_count_changes
        ),
        warnings=tuple(stats.warnings),
        started_at_unix=stats.started_at_unix,
        finished_at_unix=stats.finished_at_unix,
        fp32_fallbacks=stats.fp32_fallbacks,
    )


class ChunkQueueServicer(chunks_pb2_grpc.ChunkQueueServiceServicer):
    def __init__(self, queue: ChunkQueue) -> None:
        self._queue = queue

    async def LeaseChunk(
        self, request: chunks_pb2.LeaseChunkRequest, context: grpc.aio.ServicerContext
    ) -> chunks_pb2.LeaseChunkResponse:
        lease = await self._queue.lease(request.worker_id, request.wait_seconds)
        if lease is None:
            return chunks_pb2.LeaseChunkResponse(has_lease=False)
        return chunks_pb2.LeaseChunkResponse(has_lease=True, lease=lease_to_proto(lease))

    async def Heartbeat(
        self, request: chunks_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> chunks_pb2.HeartbeatResponse:
        answer = await self._queue.heartbeat(request.lease_id, request.frames_done, request.stage, request.faces)
        return chunks_pb2.HeartbeatResponse(stop=answer.stop, reason=answer.reason)

    async def CompleteChunk(
        self, request: chunks_pb2.CompleteChunkRequest, context: grpc.aio.ServicerContext
    ) -> chunks_pb2.CompleteChunkResponse:
        await self._queue.complete(request.lease_id, request.segment_uri, stats_from_proto(request.stats))
        return chunks_pb2.CompleteChunkResponse()

    async def FailChunk(
        self, request: chunks_pb2.FailChunkRequest, context: grpc.aio.ServicerContext
    ) -> chunks_pb2.FailChunkResponse:
        error = JobError(code=request.error.code, message=request.error.message or "worker gave no reason")
        await self._queue.fail(request.lease_id, error, request.retryable)
        return chunks_pb2.FailChunkResponse()

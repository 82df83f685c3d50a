"""Batch messages of the JobService API to domain records and back."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.common.errors import InvalidArgument
from services.common.job_vocabulary import selector_mode_from_proto
from services.gateway.batch_progress import BatchCounts, BatchProgress, BatchState
from services.gateway.job_messages import JOB_STATE_TO_PROTO, encode_options_from_proto, timestamp
from services.gateway.job_records import (
    BatchPair,
    BatchRequest,
    BatchSourceRequest,
    BatchTargetRequest,
)
from swapline.jobs.v1 import jobs_pb2

BATCH_STATE_TO_PROTO: dict[BatchState, int] = {
    "RUNNING": jobs_pb2.BATCH_STATE_RUNNING,
    "SUCCEEDED": jobs_pb2.BATCH_STATE_SUCCEEDED,
    "FAILED": jobs_pb2.BATCH_STATE_FAILED,
    "CANCELLED": jobs_pb2.BATCH_STATE_CANCELLED,
}


def _pair(message: jobs_pb2.BatchPair) -> BatchPair:
    return BatchPair(message.target_index, message.source_index)


def batch_request_from_proto(spec: jobs_pb2.BatchSpec) -> BatchRequest:
    return BatchRequest(
        targets=tuple(BatchTargetRequest(target.uri, target.filename, target.size_bytes) for target in spec.targets),
        sources=tuple(BatchSourceRequest(source.name, source.image) for source in spec.sources),
        pairs=tuple(_pair(pair) for pair in spec.pairs),
        skipped=tuple((_pair(skip.pair), skip.reason) for skip in spec.skipped),
        selector=selector_mode_from_proto(spec.selector),
        reference_image=spec.reference_image,
        encode=encode_options_from_proto(spec.encode),
        swapper=spec.swapper,
        detector=spec.detector,
        idempotency_key=spec.idempotency_key,
        name=spec.name,
    )


async def target_pieces(messages: AsyncIterator[jobs_pb2.SubmitBatchRequest]) -> AsyncIterator[tuple[int, bytes]]:
    async for message in messages:
        if message.WhichOneof("payload") != "target_piece":
            raise InvalidArgument("only target_piece messages may follow the batch spec")
        yield message.target_piece.target_index, message.target_piece.data


def _counts(counts: BatchCounts) -> jobs_pb2.BatchCounts:
    return jobs_pb2.BatchCounts(
        jobs_total=counts.jobs_total,
        queued=counts.queued,
        running=counts.running,
        succeeded=counts.succeeded,
        failed=counts.failed,
        cancelled=counts.cancelled,
        skipped=counts.skipped,
    )


def batch_to_proto(progress: BatchProgress) -> jobs_pb2.Batch:
    batch = progress.batch
    entries = []
    for entry in batch.entries:
        job = progress.jobs.get(entry.job_id)
        entries.append(
            jobs_pb2.BatchEntry(
                pair=jobs_pb2.BatchPair(target_index=entry.target_index, source_index=entry.source_index),
                job_id=entry.job_id,
                skipped=not entry.job_id,
                skip_reason=entry.skip_reason,
                state=JOB_STATE_TO_PROTO[job.state] if job is not None else jobs_pb2.JOB_STATE_UNSPECIFIED,  # type: ignore[arg-type]
            )
        )
    return jobs_pb2.Batch(
        id=batch.id,
        state=BATCH_STATE_TO_PROTO[progress.state],  # type: ignore[arg-type]
        name=batch.name,
        counts=_counts(progress.counts),
        frames_total=progress.frames_total,
        frames_done=progress.frames_done,
        created_at=timestamp(batch.created_at),
        finished_at=timestamp(progress.finished_at),
        target_names=batch.target_names,
        source_names=batch.source_names,
        entries=entries,
    )


def batch_event_to_proto(progress: BatchProgress) -> jobs_pb2.BatchEvent:
    return jobs_pb2.BatchEvent(
        batch_id=progress.batch.id,
        state=BATCH_STATE_TO_PROTO[progress.state],  # type: ignore[arg-type]
        counts=_counts(progress.counts),
        frames_done=progress.frames_done,
        frames_total=progress.frames_total,
        fps=progress.fps,
        eta_seconds=progress.eta_seconds,
        at=timestamp(progress.at),
    )

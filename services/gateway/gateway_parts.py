"""Wires the gateway's domain objects and servicers together, for __main__ and for tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.grpc_channel import channel_security
from services.common.grpc_server import ServiceBinding
from services.gateway.batch_service import BatchService
from services.gateway.chunk_queue import ChunkQueue
from services.gateway.gpu_trend_source import (
    CurrentGpuUsage,
    GpuTrendSource,
    NoTrendSource,
    PrometheusTrendSource,
    TrendLogSource,
)
from services.gateway.job_coordinator import Clock, JobCoordinator
from services.gateway.job_gpu_trend import JobTrendRecorder
from services.gateway.job_recommendation import GrpcAdvisor, JobAdvisor, NoAdvisor
from services.gateway.job_service import JobService, new_job_id
from services.gateway.job_store import JobStore
from services.gateway.media_clients import MediaServices
from services.gateway.queue_servicer import ChunkQueueServicer
from services.gateway.servicer import JobServicer
from services.gateway.settings import GatewaySettings
from swapline.chunks.v1 import chunks_pb2, chunks_pb2_grpc
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc


@dataclass(frozen=True)
class GatewayParts:
    coordinator: JobCoordinator
    queue: ChunkQueue
    jobs: JobService
    batches: BatchService

    def bindings(self) -> list[ServiceBinding]:
        return [
            ServiceBinding(
                JobServicer(self.jobs, self.batches),
                jobs_pb2_grpc.add_JobServiceServicer_to_server,
                jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
                audience="public",
            ),
            ServiceBinding(
                ChunkQueueServicer(self.queue),
                chunks_pb2_grpc.add_ChunkQueueServiceServicer_to_server,
                chunks_pb2.DESCRIPTOR.services_by_name["ChunkQueueService"].full_name,
                # Workers only: a lease hands out a tenant's source face and a completion decides its output.
                audience="internal",
            ),
        ]


def open_gpu_trend_source(settings: GatewaySettings, clock: Clock = time.time) -> GpuTrendSource:
    if settings.gpu_trend_source == "trend_log":
        return TrendLogSource(Path(settings.trend_dir), clock)
    if settings.gpu_trend_source == "prometheus":
        if not settings.prometheus_url:
            raise InvalidArgument("gpu_trend_source is prometheus but prometheus_url is empty")
        return PrometheusTrendSource(
            settings.prometheus_url, settings.prometheus_selector, settings.prometheus_timeout_seconds, clock
        )
    return NoTrendSource()


def assemble_gateway(
    settings: GatewaySettings,
    store: JobStore,
    media: MediaServices,
    clock: Clock = time.time,
    new_id: Callable[[], str] = new_job_id,
    gpu_source: GpuTrendSource | None = None,
    advisor: JobAdvisor | None = None,
) -> GatewayParts:
    """gpu_source and advisor stand in for the ones the settings name (tests)."""
    media_root = Path(settings.media_root)
    source = gpu_source if gpu_source is not None else open_gpu_trend_source(settings, clock)
    recorder = JobTrendRecorder(source, settings.gpu_trend_source, media_root)
    if advisor is None:
        advisor = (
            GrpcAdvisor(settings.advisor_target, settings.advisor_timeout_seconds, channel_security(settings))
            if settings.advisor_target
            else NoAdvisor()
        )
    retry = settings.retry_policy()
    coordinator = JobCoordinator(store, media, media_root, retry, clock, recorder, advisor)
    queue = ChunkQueue(
        coordinator,
        settings.lease_seconds,
        retry,
        settings.stall_deadline_seconds,
        settings.leased_chunk_limits(),
    )
    jobs = JobService(
        coordinator,
        queue,
        media,
        media_root,
        settings.chunk_seconds,
        settings.max_upload_bytes,
        settings.input_limits(),
        new_id,
        CurrentGpuUsage(source),
        settings.max_concurrent_image_checks,
    )
    batches = BatchService(
        coordinator,
        queue,
        jobs.intake,
        media_root,
        settings.chunk_seconds,
        recorder,
        settings.max_batch_jobs,
        new_id,
    )
    coordinator.publish_counts()
    return GatewayParts(coordinator=coordinator, queue=queue, jobs=jobs, batches=batches)

"""`python -m services.worker`: leases chunks from the gateway and runs them through the stage services.

The worker serves no API of its own: only health, reflection and metrics, beside its lease loop.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.cuda_waiting import apply_cuda_wait
from services.common.frames.frame_allocator import keep_frame_buffers
from services.common.frames.frame_streams import decoder_stub, detector_stub, encoder_stub
from services.common.grpc_channel import channel_security, open_channel
from services.common.grpc_server import configure_logging, serve
from services.common.residency_client import ResidencyClient
from services.common.settings_check import service_settings
from services.common.triton_client import TritonClient
from services.worker.arcface_embedder import ArcFaceEmbedder
from services.worker.chunk_runner import ChunkRunner, StageStubs, face_warper_for
from services.worker.face_swapper import FACE_SWAPPER_MODEL, CropTransferSwapper
from services.worker.lease_loop import LeaseLoop, LeaseLoopSettings
from services.worker.settings import SETTINGS_PREFIX, WorkerSettings, resolve_frame_format, resolve_warp_device
from services.worker.source_face import JobFaceCache
from services.worker.swapper_registry import SwapperRegistry
from swapline.chunks.v1 import chunks_pb2_grpc

SERVICE_NAME = "worker"

log = logging.getLogger(__name__)


async def run_worker(settings: WorkerSettings) -> None:
    configure_logging(settings.log_level)
    # Before torch looks for CUDA, so the context it makes has these flags.
    apply_cuda_wait(settings.cuda_wait)
    warp_device = resolve_warp_device(settings.device)
    log.info("faces are aligned and pasted back on %s (device setting %s)", warp_device, settings.device)
    warper = face_warper_for(warp_device)
    frame_format = resolve_frame_format(settings.frame_format, warper.pixel_format)
    log.info("frames come from the decoder as %s (frame format setting %s)", frame_format, settings.frame_format)
    security = channel_security(settings)
    channels = {
        name: open_channel(target, security, settings.max_message_bytes)
        for name, target in (
            ("gateway", settings.gateway_target),
            ("decoder", settings.decoder_target),
            ("detector", settings.detector_target),
            ("encoder", settings.encoder_target),
        )
    }
    triton = TritonClient(settings.triton_url, settings.triton_timeout_seconds, settings.triton_shared_memory)
    stubs = StageStubs(
        decoder=decoder_stub(channels["decoder"]),
        detector=detector_stub(channels["detector"]),
        encoder=encoder_stub(channels["encoder"]),
    )
    swapper = CropTransferSwapper(triton, crops=warper.crop_codec)
    arcface = ArcFaceEmbedder(triton, triton)
    swappers = SwapperRegistry(swapper, triton, triton, warper.crop_codec, arcface)
    residency = None
    if settings.residency_target:
        channels["residency"] = open_channel(settings.residency_target, security, settings.max_message_bytes)
        residency = ResidencyClient(channels["residency"])
    runner = ChunkRunner(
        settings, stubs, swappers, arcface, residency, JobFaceCache(), warper, frame_format, settings.frame_memory()
    )

    async def swapper_ready() -> bool:
        return await triton.is_model_ready(FACE_SWAPPER_MODEL)

    loop = LeaseLoop(
        chunks_pb2_grpc.ChunkQueueServiceStub(channels["gateway"]),
        runner.run,
        LeaseLoopSettings(
            worker_id=settings.worker_id,
            lease_wait_seconds=settings.lease_wait_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            drain_seconds=settings.drain_seconds,
            concurrency=settings.concurrency,
        ),
        ready=swapper_ready,
    )
    try:
        await serve(settings, [], SERVICE_NAME, background=[loop.run])
    finally:
        for channel in channels.values():
            await channel.close()
        await triton.close()


def main() -> None:
    settings = service_settings("worker", WorkerSettings, SETTINGS_PREFIX)
    keep_frame_buffers()
    asyncio.run(run_worker(settings))


if __name__ == "__main__":
    main()

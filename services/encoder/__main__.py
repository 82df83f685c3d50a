"""`python -m services.encoder`: the EncoderService (NVENC or libx264) on SWAPLINE_ENCODER_* settings."""

from __future__ import annotations

import asyncio
import logging

from services.common.frames.frame_allocator import keep_frame_buffers
from services.common.frames.frame_streams import register_encoder
from services.common.grpc_server import ServiceBinding, configure_logging, serve
from services.common.settings_check import service_settings
from services.encoder.encode_backend import BackendChoice, select_backend
from services.encoder.servicer import SERVICE_NAME, EncoderServicer
from services.encoder.settings import ENV_PREFIX, EncoderSettings

log = logging.getLogger(__name__)


def binding(settings: EncoderSettings, backend: BackendChoice, cores: int | None = None) -> ServiceBinding:
    servicer = EncoderServicer(settings, backend, cores, settings.frame_memory())
    threads = settings.threads or "the usable cores shared by the segments open at once"
    log.info("encoder: %d usable cores; x264 threads per segment: %s", servicer.cores, threads)
    return ServiceBinding(servicer, register_encoder, SERVICE_NAME)


def main() -> None:
    settings = service_settings("encoder", EncoderSettings, ENV_PREFIX)
    # Before the backend is chosen, so the choice and its reason reach the log.
    configure_logging(settings.log_level)
    backend = select_backend(settings.backend)
    keep_frame_buffers()
    asyncio.run(serve(settings, [binding(settings, backend)], "encoder"))


if __name__ == "__main__":
    main()

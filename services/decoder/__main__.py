"""`python -m services.decoder`: the DecoderService (NVDEC or PyAV) on SWAPLINE_DECODER_* settings."""

from __future__ import annotations

import asyncio

from services.common.cuda_waiting import apply_cuda_wait
from services.common.frames.frame_allocator import keep_frame_buffers
from services.common.frames.frame_streams import register_decoder
from services.common.grpc_server import ServiceBinding, configure_logging, serve
from services.common.settings_check import service_settings
from services.decoder.decode_backend import BackendChoice, select_backend
from services.decoder.servicer import SERVICE_NAME, DecoderServicer
from services.decoder.settings import ENV_PREFIX, DecoderSettings


def binding(settings: DecoderSettings, backend: BackendChoice) -> ServiceBinding:
    servicer = DecoderServicer(settings, backend, frame_memory=settings.frame_memory())
    return ServiceBinding(servicer, register_decoder, SERVICE_NAME)


def main() -> None:
    settings = service_settings("decoder", DecoderSettings, ENV_PREFIX)
    # Before the backend is chosen, so the choice and its reason reach the log.
    configure_logging(settings.log_level)
    # Before NVDEC or the frame copier makes the CUDA context, whose flags this sets.
    apply_cuda_wait(settings.cuda_wait)
    backend = select_backend(settings.backend, settings.gpu_id)
    keep_frame_buffers()
    asyncio.run(serve(settings, [binding(settings, backend)], "decoder"))


if __name__ == "__main__":
    main()

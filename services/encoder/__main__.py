"""`python -m services.encoder`: the EncoderService (PyAV, libx264) on SWAPLINE_ENCODER_* settings."""

from __future__ import annotations

import asyncio

from services.common.frame_allocator import keep_frame_buffers
from services.common.frame_streams import register_encoder
from services.common.grpc_server import ServiceBinding, serve
from services.common.settings_loader import load_settings
from services.encoder.servicer import SERVICE_NAME, EncoderServicer
from services.encoder.settings import ENV_PREFIX, EncoderSettings


def binding(settings: EncoderSettings) -> ServiceBinding:
    return ServiceBinding(EncoderServicer(settings), register_encoder, SERVICE_NAME)


def main() -> None:
    settings = load_settings(EncoderSettings, ENV_PREFIX)
    keep_frame_buffers()
    asyncio.run(serve(settings, [binding(settings)], "encoder"))


if __name__ == "__main__":
    main()

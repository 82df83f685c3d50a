"""`python -m services.decoder`: the DecoderService (PyAV) on SWAPLINE_DECODER_* settings."""

from __future__ import annotations

import asyncio

from services.common.frame_allocator import keep_frame_buffers
from services.common.frame_streams import register_decoder
from services.common.grpc_server import ServiceBinding, serve
from services.common.settings_loader import load_settings
from services.decoder.servicer import SERVICE_NAME, DecoderServicer
from services.decoder.settings import ENV_PREFIX, DecoderSettings


def binding(settings: DecoderSettings) -> ServiceBinding:
    return ServiceBinding(DecoderServicer(settings), register_decoder, SERVICE_NAME)


def main() -> None:
    settings = load_settings(DecoderSettings, ENV_PREFIX)
    keep_frame_buffers()
    asyncio.run(serve(settings, [binding(settings)], "decoder"))


if __name__ == "__main__":
    main()

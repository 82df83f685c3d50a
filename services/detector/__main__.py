"""`python -m services.detector`: the DetectorService (MTCNN on Triton, as one model where it is served) on
SWAPLINE_DETECTOR_* settings."""

from __future__ import annotations

import asyncio

from services.common.frames.frame_allocator import keep_frame_buffers
from services.common.grpc_server import serve
from services.common.settings_check import service_settings
from services.common.triton_client import TritonClient
from services.detector.detector_choice import ChosenDetector, TritonReadinessProbe
from services.detector.servicer import detector_binding
from services.detector.settings import ENV_PREFIX, DetectorSettings


def chosen_detector(settings: DetectorSettings, client: TritonClient) -> ChosenDetector:
    """The detector over `client`, choosing its models by asking Triton on channels of the probe's own."""
    probe = TritonReadinessProbe(settings.triton_url, settings.triton_timeout_seconds)
    return ChosenDetector(client, probe, settings.cascade, settings.detection_defaults())


async def run(settings: DetectorSettings) -> None:
    # Created inside the running loop: the aio channel belongs to the loop that opens it.
    client = TritonClient(settings.triton_url, settings.triton_timeout_seconds, settings.triton_shared_memory)
    try:
        detector = chosen_detector(settings, client)
        await detector.choose()
        await serve(settings, [detector_binding(detector)], "detector")
    finally:
        await client.close()


def main() -> None:
    settings = service_settings("detector", DetectorSettings, ENV_PREFIX)
    keep_frame_buffers()
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()

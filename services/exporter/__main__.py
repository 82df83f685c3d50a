"""`python -m services.exporter`: the NVML GPU exporter (one per GPU node) on SWAPLINE_EXPORTER_* settings."""

from __future__ import annotations

import logging
import signal
from types import FrameType

from services.common.settings_check import service_settings
from services.exporter.exporter_runtime import start_exporter
from services.exporter.settings import ENV_PREFIX, ExporterSettings


def main() -> None:
    settings = service_settings("exporter", ExporterSettings, ENV_PREFIX)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exporter = start_exporter(settings)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        exporter.request_stop()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(f"exporter listening on {settings.host}:{exporter.server.port}", flush=True)
    exporter.wait()
    exporter.stop()


if __name__ == "__main__":
    main()

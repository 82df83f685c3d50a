"""Builds and runs the exporter: reader, trend log, attribution, sampling thread and HTTP server."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from services.common.gpu_telemetry import GpuReader, NvmlReader
from services.common.gpu_trend_log import TrendLog
from services.exporter.gpu_metrics import exporter_registry
from services.exporter.gpu_recording import RecordedReader
from services.exporter.gpu_sampler import GpuSampler
from services.exporter.http_server import ExporterHttpServer
from services.exporter.pod_attribution import PodAttributor, attributor_for_node
from services.exporter.settings import ExporterSettings

log = logging.getLogger(__name__)


def node_name(settings: ExporterSettings) -> str:
    return settings.node_name or socket.gethostname()


def reader_for(settings: ExporterSettings) -> GpuReader:
    if settings.replay:
        return RecordedReader(Path(settings.replay), clock=time.time)
    return NvmlReader()


class RunningExporter:
    """A started exporter; `stop()` ends the loop, the server, the trend log, the reader and the kubelet
    client, in that order."""

    def __init__(
        self,
        settings: ExporterSettings,
        reader: GpuReader,
        attributor: PodAttributor | None = None,
    ) -> None:
        node = node_name(settings)
        self.reader = reader
        self.attributor = attributor
        self.trend_log = TrendLog(settings.trend_dir, node, settings.retention_days)
        self.sampler = GpuSampler(
            reader,
            node=node,
            interval_seconds=settings.interval_seconds,
            trend_log=self.trend_log,
            attributor=attributor,
        )
        self._stop = threading.Event()
        self._loop = threading.Thread(
            target=self.sampler.run,
            args=(self._stop.wait,),
            kwargs={"first_delay": settings.interval_seconds},
            name="gpu-sampler",
            daemon=True,
        )
        self.registry = exporter_registry(lambda: self.sampler.snapshot, node)
        self.server = ExporterHttpServer(settings.host, settings.port, self.registry, self.healthy)

    def healthy(self) -> bool:
        return self._loop.is_alive() and self.sampler.loop_alive()

    def start(self) -> RunningExporter:
        # One sweep before serving, so the first scrape already has data (or the reason there is none).
        self.sampler.sweep()
        self._loop.start()
        self.server.start()
        return self

    def wait(self) -> None:
        self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
        self._loop.join()
        self.trend_log.close()
        self.reader.close()
        if self.attributor is not None:
            self.attributor.close()


def start_exporter(settings: ExporterSettings, reader: GpuReader | None = None) -> RunningExporter:
    attributor = attributor_for_node(settings.kubernetes_attribution, settings.pod_resources_socket)
    return RunningExporter(settings, reader if reader is not None else reader_for(settings), attributor).start()

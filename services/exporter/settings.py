"""The exporter's settings, read from SWAPLINE_EXPORTER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.server_settings import ServerSettings
from services.common.settings_loader import load_settings, ranged

ENV_PREFIX = "SWAPLINE_EXPORTER_"


@dataclass(frozen=True, kw_only=True)
class ExporterSettings(ServerSettings):
    host: str = "0.0.0.0"
    # dcgm-exporter's port, so existing scrape configs and dashboards find it.
    port: int = ranged(9400, ge=0, le=65535)
    interval_seconds: float = ranged(1.0, ge=0.05, le=3600.0)
    # Set from the downward API (spec.nodeName) in the DaemonSet; empty means the hostname.
    node_name: str = ""
    trend_dir: Path = Path("gpu-trend")
    retention_days: int = ranged(7, ge=1, le=3650)
    # Path of a recording (JSON lines) to replay instead of reading NVML; empty reads the GPUs.
    replay: str = ""
    # Attributes each GPU to the pod containers it is allocated to, through the kubelet's pod-resources API
    # on this Unix socket; where its folder is absent (not a Kubernetes node) GPUs go without pods.
    kubernetes_attribution: bool = True
    pod_resources_socket: Path = Path("/var/lib/kubelet/pod-resources/kubelet.sock")


def load_exporter_settings() -> ExporterSettings:
    return load_settings(ExporterSettings, ENV_PREFIX)

"""Gateway settings, read from SWAPLINE_GATEWAY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged
from services.gateway.gpu_trend_source import GpuTrendSourceKind

ENV_PREFIX = "SWAPLINE_GATEWAY_"


@dataclass(frozen=True, kw_only=True)
class GatewaySettings(ServerSettings):
    # Uploads, chunk segments, outputs and reports live here; the decoder and encoder share it.
    media_root: Path
    decoder_target: str
    detector_target: str
    encoder_target: str
    # Empty means sqlite:///<media_root>/swapline.db (one gateway); a postgresql:// URL lets gateways share jobs.
    database_url: str = ""
    # Chunks span whole GOPs of at least this many seconds, except the last one.
    chunk_seconds: float = ranged(2.0, gt=0.0, le=600.0)
    lease_seconds: float = ranged(30.0, ge=1.0, le=3600.0)
    max_attempts: int = ranged(3, ge=1, le=100)
    max_upload_bytes: int = ranged(4 * 1024**3, ge=1)
    downstream_timeout_seconds: float = ranged(60.0, gt=0.0)
    join_timeout_seconds: float = ranged(1800.0, gt=0.0)
    # Where job GPU trends come from: the exporter's trend log on this machine (single node, embedded),
    # Prometheus in a cluster (the GPUs belong to Triton's nodes, not the gateway's or the workers'),
    # or nowhere (every report says CPU mode).
    gpu_trend_source: GpuTrendSourceKind = "none"
    trend_dir: Path = Path("gpu-trend")
    prometheus_url: str = ""
    # Label matchers limiting the GPUs charted, e.g. node=~"gpu-node-.*"; empty charts every GPU.
    prometheus_selector: str = ""
    prometheus_timeout_seconds: float = ranged(10.0, gt=0.0)
    # The advisor service that adds a GPU recommendation to succeeded jobs' reports; empty for none.
    advisor_target: str = ""
    advisor_timeout_seconds: float = ranged(10.0, gt=0.0)

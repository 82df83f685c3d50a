"""Gateway settings, read from SWAPLINE_GATEWAY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.input_limits import (
    DEFAULT_MAX_DURATION_SECONDS,
    DEFAULT_MAX_FILENAME_LENGTH,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_URI_LENGTH,
    DEFAULT_MAX_VIDEO_PIXELS,
    InputLimits,
    limits_from,
)
from services.common.server_settings import ServerSettings
from services.common.settings_loader import SettingsError, ranged
from services.gateway.gpu_trend_source import GpuTrendSourceKind
from services.gateway.retention_policy import RetentionLimits, RetentionPolicy, tenant_limits
from services.gateway.retry_policy import RetryPolicy
from services.gateway.tenant_chunk_limits import MAX_LEASED_CHUNKS_CEILING, TenantChunkLimits, tenant_chunk_limits

ENV_PREFIX = "SWAPLINE_GATEWAY_"

# OpenCV refuses pictures past 2**30 pixels whatever it is told, FFmpeg a little later.
_PIXEL_CEILING = 2**30
# Images travel inside the SubmitJob spec message, which gRPC caps below 2 GiB.
_IMAGE_BYTES_CEILING = 2**31 - 1
# Byte counts end in BIGINT columns and float gauges: 2**53 (8 PiB) is the largest a double holds exactly.
_BYTES_CEILING = 2**53


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
    # A failed chunk (or join) is tried again after a backoff doubling from the initial one up to the
    # maximum, until retry_budget_seconds have passed since the first failure of its current run of
    # failures (progress ends a run); max_attempts bounds the leases of one chunk besides.
    retry_budget_seconds: float = ranged(120.0, ge=0.0, le=86400.0)
    retry_initial_backoff_seconds: float = ranged(1.0, gt=0.0, le=3600.0)
    retry_max_backoff_seconds: float = ranged(30.0, gt=0.0, le=3600.0)
    max_attempts: int = ranged(50, ge=1, le=10000)
    # A running job whose leased chunks make no progress (frames rising, a chunk completing) for this long
    # fails with DEADLINE_EXCEEDED; time with no chunk leased (queued, workers waiting for Triton's
    # models) is not counted. 0: no deadline.
    stall_deadline_seconds: float = ranged(300.0, ge=0.0, le=86400.0)
    # Seconds between reads of the store's job and open-chunk counts (the swapline_gateway_jobs and
    # swapline_gateway_chunks_open gauges, the workers' autoscaling signal). Each gateway also reads them after
    # its own changes; this bounds how long other gateways' changes take to show.
    store_counts_refresh_seconds: float = ranged(5.0, ge=0.5, le=300.0)
    max_upload_bytes: int = ranged(4 * 1024**3, ge=1, le=_BYTES_CEILING)
    # The most jobs one SubmitBatch may make (targets times sources, or pairs), and the most targets or sources
    # it may name.
    max_batch_jobs: int = ranged(10_000, ge=1, le=1_000_000)
    # Submissions whose images are decoded and face-counted at once; the rest of a burst waits its turn.
    max_concurrent_image_checks: int = ranged(4, ge=1, le=256)
    # Checked at submit before anything large is allocated: the source and reference images (bytes, and
    # pixels read from their header), the target's frame size, frames and duration (from the probe), and
    # the lengths of target_uri and target_filename.
    max_image_bytes: int = ranged(DEFAULT_MAX_IMAGE_BYTES, ge=1, le=_IMAGE_BYTES_CEILING)
    max_image_pixels: int = ranged(DEFAULT_MAX_IMAGE_PIXELS, ge=1, le=_PIXEL_CEILING)
    max_video_pixels: int = ranged(DEFAULT_MAX_VIDEO_PIXELS, ge=1, le=_PIXEL_CEILING)
    max_frames: int = ranged(DEFAULT_MAX_FRAMES, ge=1, le=100_000_000)
    max_duration_seconds: float = ranged(DEFAULT_MAX_DURATION_SECONDS, gt=0.0)
    max_uri_length: int = ranged(DEFAULT_MAX_URI_LENGTH, ge=1, le=4096)
    max_filename_length: int = ranged(DEFAULT_MAX_FILENAME_LENGTH, ge=1, le=DEFAULT_MAX_FILENAME_LENGTH)
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
    # Retention (media_retention.py): ended jobs are deleted with their files once they ended
    # retention_max_age_seconds ago (0 keeps them); at retention_max_bytes of stored media (0: no limit)
    # a tenant's submissions are refused with RESOURCE_EXHAUSTED. retention_tenant_limits sets both for
    # named tenants: comma-separated tenant:max_age_seconds:max_bytes entries.
    retention_max_age_seconds: float = ranged(7 * 86400.0, ge=0.0)
    retention_max_bytes: int = ranged(0, ge=0, le=_BYTES_CEILING)
    retention_tenant_limits: tuple[str, ...] = ranged((), max_length=10000)
    # Partial uploads and folders of submissions that never reached the store go once untouched this long.
    retention_interrupted_seconds: float = ranged(3600.0, ge=60.0, le=30 * 86400.0)
    retention_sweep_interval_seconds: float = ranged(300.0, ge=1.0, le=86400.0)
    # Scheduling (tenant_chunk_limits.py): leases go to interactive jobs before batch jobs, then to the tenant
    # holding the fewest leased chunks, then to the oldest job. A tenant holding tenant_max_leased_chunks leased
    # chunks (0: no limit) gets no further lease, even with workers idle, until one of them ends;
    # tenant_chunk_limits sets the limit for named tenants: comma-separated tenant:max_leased_chunks entries.
    tenant_max_leased_chunks: int = ranged(0, ge=0, le=MAX_LEASED_CHUNKS_CEILING)
    tenant_chunk_limits: tuple[str, ...] = ranged((), max_length=10000)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.retention_policy()
        self.leased_chunk_limits()
        if self.retry_max_backoff_seconds < self.retry_initial_backoff_seconds:
            raise SettingsError(
                f"retry_max_backoff_seconds={self.retry_max_backoff_seconds:g} must be at least "
                f"retry_initial_backoff_seconds={self.retry_initial_backoff_seconds:g}",
                "retry_max_backoff_seconds",
            )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            budget_seconds=self.retry_budget_seconds,
            initial_backoff_seconds=self.retry_initial_backoff_seconds,
            max_backoff_seconds=self.retry_max_backoff_seconds,
            max_attempts=self.max_attempts,
        )

    def input_limits(self) -> InputLimits:
        return limits_from(self)

    def retention_policy(self) -> RetentionPolicy:
        return RetentionPolicy(
            default=RetentionLimits(self.retention_max_age_seconds, self.retention_max_bytes),
            tenants=tenant_limits(self.retention_tenant_limits),
            interrupted_seconds=self.retention_interrupted_seconds,
            sweep_interval_seconds=self.retention_sweep_interval_seconds,
        )

    def leased_chunk_limits(self) -> TenantChunkLimits:
        return tenant_chunk_limits(self.tenant_max_leased_chunks, self.tenant_chunk_limits)

"""Advisor settings, read from SWAPLINE_ADVISOR_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged

ENV_PREFIX = "SWAPLINE_ADVISOR_"
DEFAULT_HEADROOM_FRACTION = 0.15
DEFAULT_JOB_LIMIT = 200


@dataclass(frozen=True, kw_only=True)
class AdvisorSettings(ServerSettings):
    # The gateway's JobService: job reports (GetJob, ListJobs) and the pending work behind the gauges.
    gateway_target: str
    # A YAML GPU catalog replacing the packaged one (the chart mounts one rendered from Helm values).
    catalog_path: str = ""
    # A calibration JSON (services/advisor/calibration_fitter.py writes one) replacing the packaged one.
    calibration_path: str = ""
    # Fraction of a job's peak GPU memory kept free on top of it before a GPU counts as fitting.
    headroom_fraction: float = ranged(DEFAULT_HEADROOM_FRACTION, ge=0.0, le=1.0)
    # Seconds between recomputations of the autoscaling gauges from the gateway's jobs.
    refresh_seconds: float = ranged(30.0, gt=0.0)
    # How soon the pending frames should be done: the worker gauge asks for enough replicas for it.
    target_chunk_seconds: float = ranged(60.0, gt=0.0)
    max_worker_replicas: int = ranged(32, ge=1)
    max_triton_replicas: int = ranged(8, ge=1)
    # The Triton gauge plans for GPUs this busy, leaving room for bursts.
    target_gpu_utilization: float = ranged(0.8, gt=0.0, le=1.0)
    # Per-worker fps assumed until a succeeded job has measured one.
    default_worker_fps: float = ranged(10.0, gt=0.0)
    # Jobs read per refresh and per FleetReport when the request leaves limit at 0.
    default_job_limit: int = ranged(DEFAULT_JOB_LIMIT, ge=1, le=1000)

"""Advisor settings, read from SWAPLINE_ADVISOR_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged

ENV_PREFIX = "SWAPLINE_ADVISOR_"
DEFAULT_HEADROOM_FRACTION = 0.15
DEFAULT_JOB_LIMIT = 200
# Far past any fleet the advisor plans; the gauges feed an autoscaler's replica count.
MAX_REPLICAS = 1000
# Where the advisor reads the cluster's GPU nodes: nowhere, or the Kubernetes API through the pod's ServiceAccount.
ClusterNodesSource = Literal["off", "in_cluster"]


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
    max_worker_replicas: int = ranged(32, ge=1, le=MAX_REPLICAS)
    max_triton_replicas: int = ranged(8, ge=1, le=MAX_REPLICAS)
    # The Triton gauge plans for GPUs this busy, leaving room for bursts.
    target_gpu_utilization: float = ranged(0.8, gt=0.0, le=1.0)
    # Per-worker fps assumed until a succeeded job has measured one.
    default_worker_fps: float = ranged(10.0, gt=0.0)
    # Jobs read per refresh and per FleetReport when the request leaves limit at 0.
    default_job_limit: int = ranged(DEFAULT_JOB_LIMIT, ge=1, le=1000)
    # The cluster's GPU nodes (nvidia.com/gpu.product, nvidia.com/gpu counts), shown beside the recommendations;
    # in_cluster needs nodes get/list (the chart's advisor.clusterNodes.enabled grants it).
    cluster_nodes: ClusterNodesSource = "off"
    # Seconds between reads of the nodes.
    cluster_nodes_refresh_seconds: float = ranged(300.0, gt=0.0, le=86400.0)
    # Seconds one request to the Kubernetes API may take; a read that fails waits for the next refresh.
    cluster_nodes_timeout_seconds: float = ranged(10.0, gt=0.0, le=300.0)

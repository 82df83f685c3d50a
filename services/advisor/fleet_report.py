"""Over many job profiles: the share of jobs each GPU fits, and cost as run against cost as recommended.

Every catalog GPU has a row; the cluster's GPUs, where the advisor reads them, are counted beside the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.advisor.cluster_inventory import NO_CLUSTER, ClusterInventory
from services.advisor.gpu_recommender import Recommendation, recommend_gpu
from services.advisor.job_profile import JobProfile
from services.advisor.time_predictor import Calibration
from services.common.gpu_catalog import GpuCatalog


@dataclass(frozen=True)
class FleetGpuRow:
    gpu: str
    jobs_fitting: int
    fit_share: float
    # Over the jobs it fits; 0 when it fits none.
    mean_predicted_seconds: float
    jobs_recommended: int
    recommended_cost_usd: float
    jobs_run: int
    as_run_cost_usd: float
    # GPUs of this model on the cluster's nodes; 0 when it has none or the cluster is not read.
    cluster_gpus: int


@dataclass(frozen=True)
class FleetReport:
    jobs: int
    rows: tuple[FleetGpuRow, ...]
    # Totals over the compared jobs: those that ran on a priced catalog GPU and got a recommendation.
    jobs_compared: int
    as_run_cost_usd: float
    recommended_cost_usd: float
    savings_percent: float
    jobs_unpriced: int
    jobs_without_recommendation: int
    skipped: tuple[str, ...]
    cluster: ClusterInventory


def as_run_cost_usd(profile: JobProfile, catalog: GpuCatalog) -> float | None:
    """What the job cost on the GPU it ran on, at catalog price; None when the catalog does not price it."""
    gpu = catalog.find(profile.gpu_model)
    return None if gpu is None else gpu.price_per_hour_usd * profile.wall_seconds / 3600.0


def build_fleet_report(
    profiles: Sequence[JobProfile],
    catalog: GpuCatalog,
    calibration: Calibration,
    headroom_fraction: float,
    deadline_seconds: float | None = None,
    skipped: Sequence[str] = (),
    cluster: ClusterInventory = NO_CLUSTER,
) -> FleetReport:
    recommendations: list[Recommendation] = [
        recommend_gpu(profile, catalog, calibration, headroom_fraction, deadline_seconds, cluster)
        for profile in profiles
    ]
    rows = []
    for gpu in catalog.gpus:
        fitting = [
            option
            for recommendation in recommendations
            for option in recommendation.options
            if option.gpu.name == gpu.name and option.fits
        ]
        chosen = [r for r in recommendations if r.recommended is not None and r.recommended.gpu.name == gpu.name]
        ran_here = [profile for profile in profiles if catalog.find(profile.gpu_model) == gpu]
        rows.append(
            FleetGpuRow(
                gpu=gpu.name,
                jobs_fitting=len(fitting),
                fit_share=len(fitting) / len(profiles) if profiles else 0.0,
                mean_predicted_seconds=sum(option.predicted_seconds for option in fitting) / len(fitting)
                if fitting
                else 0.0,
                jobs_recommended=len(chosen),
                recommended_cost_usd=sum(r.recommended.cost_usd for r in chosen if r.recommended is not None),
                jobs_run=len(ran_here),
                as_run_cost_usd=sum(profile.wall_seconds for profile in ran_here) * gpu.price_per_hour_usd / 3600.0,
                cluster_gpus=cluster.gpus_of(gpu.name),
            )
        )
    as_run_total = 0.0
    recommended_total = 0.0
    compared = unpriced = 0
    for recommendation in recommendations:
        cost = as_run_cost_usd(recommendation.profile, catalog)
        if cost is None:
            unpriced += 1
            continue
        if recommendation.recommended is None:
            continue
        compared += 1
        as_run_total += cost
        recommended_total += recommendation.recommended.cost_usd
    return FleetReport(
        jobs=len(profiles),
        rows=tuple(rows),
        jobs_compared=compared,
        as_run_cost_usd=as_run_total,
        recommended_cost_usd=recommended_total,
        savings_percent=100.0 * (as_run_total - recommended_total) / as_run_total if as_run_total > 0 else 0.0,
        jobs_unpriced=unpriced,
        jobs_without_recommendation=sum(1 for r in recommendations if r.recommended is None),
        skipped=tuple(skipped),
        cluster=cluster,
    )

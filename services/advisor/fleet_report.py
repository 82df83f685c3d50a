"""Over many job profiles: the share of jobs each GPU fits, and cost as run against cost as recommended.

Every catalog GPU has a row; the cluster's GPUs, where the advisor reads them, are counted beside the rows.
Beside the rows, "2 x a smaller GPU" against "1 x a bigger one": each catalog GPU taken two to a machine, its
time from the calibration's measured scaling over one GPU (services/cli/gpu_layout.py spreads the workers),
against the cheapest single GPU at least as fast on the same jobs. Without a two-GPU measurement an option says
so and predicts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.advisor.cluster_inventory import NO_CLUSTER, ClusterInventory
from services.advisor.gpu_recommender import GpuOption, Recommendation, recommend_gpu
from services.advisor.job_profile import JobProfile
from services.advisor.time_predictor import Calibration
from services.common.gpu_catalog import GpuCatalog, GpuSpec


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


# The machine sizes compared against one GPU.
COMPARED_GPU_COUNT = 2


@dataclass(frozen=True)
class MultiGpuOption:
    """`gpu_count` GPUs of one model on one machine, over the jobs one of them fits (each GPU holds the models)."""

    gpu: str
    gpu_count: int
    jobs_fitting: int
    # The calibration's measured throughput of gpu_count GPUs over one; None: not measured, nothing predicted.
    scaling: float | None
    predicted_seconds: float | None
    cost_usd: float | None
    # The cheapest single catalog GPU that fits the same jobs and is at least as fast; "" when none is.
    single_gpu: str
    single_gpu_cost_usd: float | None
    # Cheaper than that single GPU (or no single GPU is as fast).
    recommended: bool
    reason: str


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
    multi_gpu: tuple[MultiGpuOption, ...] = ()


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
        multi_gpu=multi_gpu_options(recommendations, catalog, calibration),
    )


def _fitting(recommendations: Sequence[Recommendation], gpu: str) -> list[tuple[Recommendation, GpuOption]]:
    return [
        (recommendation, option)
        for recommendation in recommendations
        for option in recommendation.options
        if option.gpu.name == gpu and option.fits
    ]


def _several_gpus(
    recommendations: Sequence[Recommendation],
    catalog: GpuCatalog,
    gpu: GpuSpec,
    fitting: list[tuple[Recommendation, GpuOption]],
    gpu_count: int,
    scaling: float | None,
) -> MultiGpuOption:
    several = f"{gpu_count} x {gpu.name}"
    if scaling is None:
        reason = f"{several}: no {gpu_count}-GPU measurement in the calibration, so no time or cost is predicted"
        return MultiGpuOption(gpu.name, gpu_count, len(fitting), None, None, None, "", None, False, reason)
    seconds = sum(option.predicted_seconds for _, option in fitting) / scaling
    cost = gpu_count * gpu.price_per_hour_usd * seconds / 3600.0
    jobs = {id(recommendation) for recommendation, _ in fitting}
    # (cost, seconds, name) of each single GPU that fits the same jobs and runs them at least as fast.
    singles = []
    for single in catalog.gpus:
        same_jobs = [
            option for recommendation, option in _fitting(recommendations, single.name) if id(recommendation) in jobs
        ]
        single_seconds = sum(option.predicted_seconds for option in same_jobs)
        if len(same_jobs) == len(jobs) and single_seconds <= seconds:
            singles.append((sum(option.cost_usd for option in same_jobs), single_seconds, single.name))
    reason = f"{several}: {seconds:.1f} s for {len(fitting)} job(s) ({scaling:.2f}x one GPU, measured), ${cost:.6f}"
    if not singles:
        reason = f"{reason}; no single GPU is as fast"
        return MultiGpuOption(gpu.name, gpu_count, len(fitting), scaling, seconds, cost, "", None, True, reason)
    single_cost, single_seconds, single_name = min(singles)
    cheaper = cost < single_cost
    verdict = f"{several} is cheaper" if cheaper else f"1 x {single_name} is as cheap or cheaper"
    reason = f"{reason}; 1 x {single_name}: {single_seconds:.1f} s, ${single_cost:.6f} — {verdict}"
    return MultiGpuOption(
        gpu.name, gpu_count, len(fitting), scaling, seconds, cost, single_name, single_cost, cheaper, reason
    )


def multi_gpu_options(
    recommendations: Sequence[Recommendation],
    catalog: GpuCatalog,
    calibration: Calibration,
    gpu_count: int = COMPARED_GPU_COUNT,
) -> tuple[MultiGpuOption, ...]:
    """Per catalog GPU that fits any job: `gpu_count` of it against the cheapest single GPU as fast."""
    scaling = calibration.gpu_scaling.get(gpu_count)
    return tuple(
        _several_gpus(recommendations, catalog, gpu, fitting, gpu_count, scaling)
        for gpu in catalog.gpus
        if (fitting := _fitting(recommendations, gpu.name))
    )

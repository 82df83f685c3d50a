"""Per job: each catalog GPU's predicted time, cost and fit; the cheapest that fits and meets a deadline.

Every catalog GPU is an option whether or not the cluster has it (node pools may scale to zero); the cluster's
GPUs, where the advisor reads them, are shown beside: per option, and in the reason of the one recommended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.advisor.cluster_inventory import NO_CLUSTER, ClusterInventory
from services.advisor.job_profile import JobProfile
from services.advisor.time_predictor import (
    Calibration,
    predict_peak_memory_bytes,
    predict_seconds,
)
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import GIB, GpuCatalog, GpuSpec


@dataclass(frozen=True)
class GpuOption:
    gpu: GpuSpec
    predicted_seconds: float
    cost_usd: float
    fits: bool
    memory_needed_bytes: int
    meets_deadline: bool
    calibrated: bool
    # GPUs of this model on the cluster's nodes; 0 when it has none or the cluster is not read.
    cluster_gpus: int


@dataclass(frozen=True)
class Recommendation:
    profile: JobProfile
    # Every catalog GPU, cheapest first (faster first at equal cost).
    options: tuple[GpuOption, ...]
    recommended: GpuOption | None
    reason: str
    deadline_seconds: float | None
    # True when the job ran without a GPU and its memory comes from the calibration's memory model.
    memory_estimated: bool
    cluster: ClusterInventory

    @property
    def recommended_in_cluster(self) -> bool:
        """Whether the cluster already has GPUs of the recommended model."""
        return self.recommended is not None and self.recommended.cluster_gpus > 0


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def _dollars(value: float) -> str:
    return f"${value:.6f}" if value < 0.01 else f"${value:.3f}" if value < 1 else f"${value:.2f}"


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def validate_deadline(deadline_seconds: float | None) -> float | None:
    """0 and None both mean no deadline; a negative or non-finite one is a caller's mistake."""
    if deadline_seconds is None or deadline_seconds == 0:
        return None
    if not math.isfinite(deadline_seconds) or deadline_seconds < 0:
        raise InvalidArgument(f"deadline_seconds must be positive (or 0 for none), got {deadline_seconds}")
    return deadline_seconds


def gpu_options(
    profile: JobProfile,
    catalog: GpuCatalog,
    calibration: Calibration,
    headroom_fraction: float,
    deadline_seconds: float | None = None,
    cluster: ClusterInventory = NO_CLUSTER,
) -> tuple[GpuOption, ...]:
    if not math.isfinite(headroom_fraction) or headroom_fraction < 0:
        raise InvalidArgument(f"headroom_fraction must be a non-negative number, got {headroom_fraction}")
    deadline = validate_deadline(deadline_seconds)
    source_gpu = catalog.find(profile.gpu_model)
    needed = math.ceil(predict_peak_memory_bytes(profile, calibration) * (1.0 + headroom_fraction))
    options = []
    for gpu in catalog.gpus:
        seconds = predict_seconds(profile, gpu, calibration, source_gpu)
        options.append(
            GpuOption(
                gpu=gpu,
                predicted_seconds=seconds,
                cost_usd=gpu.price_per_hour_usd * seconds / 3600.0,
                fits=needed <= gpu.memory_bytes,
                memory_needed_bytes=needed,
                meets_deadline=deadline is None or seconds <= deadline,
                calibrated=calibration.is_measured(gpu),
                cluster_gpus=cluster.gpus_of(gpu.name),
            )
        )
    return tuple(sorted(options, key=lambda option: (option.cost_usd, option.predicted_seconds, option.gpu.name)))


def _chosen_reason(
    option: GpuOption, headroom_fraction: float, deadline: float | None, estimated: bool, cluster: ClusterInventory
) -> str:
    peak = _gib(option.memory_needed_bytes / (1.0 + headroom_fraction))
    note = ", memory estimated: the job ran without a GPU" if estimated else ""
    memory = f"fits ({peak} of {_gib(option.gpu.memory_bytes)} GiB with {headroom_fraction:.0%} headroom{note})"
    timing = _seconds(option.predicted_seconds)
    if deadline is not None:
        timing = f"{timing} < {_seconds(deadline)} deadline"
        why = "cheapest that fits and meets the deadline"
    else:
        why = "cheapest that fits"
    reason = f"{option.gpu.name}: {memory}, {timing}, {_dollars(option.cost_usd)} — {why}"
    note = cluster.note_on(option.gpu.name)
    return f"{reason}; {note}" if note else reason


def _refusal_reason(options: tuple[GpuOption, ...], headroom_fraction: float, deadline: float | None) -> str:
    fitting = [option for option in options if option.fits]
    needed = options[0].memory_needed_bytes
    if not fitting:
        largest = max(options, key=lambda option: option.gpu.memory_bytes)
        peak = _gib(needed / (1.0 + headroom_fraction))
        return (
            f"no catalog GPU fits: the job needs {_gib(needed)} GiB ({peak} GiB "
            f"peak with {headroom_fraction:.0%} headroom); the largest, {largest.gpu.name}, has "
            f"{_gib(largest.gpu.memory_bytes)} GiB"
        )
    fastest = min(fitting, key=lambda option: option.predicted_seconds)
    return (
        f"no GPU that fits meets the {_seconds(deadline or 0.0)} deadline: the fastest that fits, "
        f"{fastest.gpu.name}, needs {_seconds(fastest.predicted_seconds)} ({_dollars(fastest.cost_usd)})"
    )


def recommend_gpu(
    profile: JobProfile,
    catalog: GpuCatalog,
    calibration: Calibration,
    headroom_fraction: float,
    deadline_seconds: float | None = None,
    cluster: ClusterInventory = NO_CLUSTER,
) -> Recommendation:
    deadline = validate_deadline(deadline_seconds)
    options = gpu_options(profile, catalog, calibration, headroom_fraction, deadline, cluster)
    estimated = not (profile.gpu_model and profile.memory_peak_bytes > 0)
    chosen = next((option for option in options if option.fits and option.meets_deadline), None)
    reason = (
        _chosen_reason(chosen, headroom_fraction, deadline, estimated, cluster)
        if chosen is not None
        else _refusal_reason(options, headroom_fraction, deadline)
    )
    return Recommendation(profile, options, chosen, reason, deadline, estimated, cluster)


def recommendation_report_section(recommendation: Recommendation) -> dict[str, Any]:
    """The `recommendation` section a job report carries (JSON-ready)."""
    chosen = recommendation.recommended
    return {
        "recommended_gpu": chosen.gpu.name if chosen else "",
        "reason": recommendation.reason,
        "deadline_seconds": recommendation.deadline_seconds,
        "memory_estimated": recommendation.memory_estimated,
        "recommended_in_cluster": recommendation.recommended_in_cluster,
        "options": [
            {
                "gpu": option.gpu.name,
                "predicted_seconds": round(option.predicted_seconds, 3),
                "cost_usd": round(option.cost_usd, 6),
                "fits": option.fits,
                "memory_needed_bytes": option.memory_needed_bytes,
                "memory_bytes": option.gpu.memory_bytes,
                "meets_deadline": option.meets_deadline,
                "calibrated": option.calibrated,
                "cluster_gpus": option.cluster_gpus,
            }
            for option in recommendation.options
        ],
    }

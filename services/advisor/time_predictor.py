"""Predicts a job's wall time on any catalog GPU from its measured profile, with a calibrated per-stage model.

The model (docs/advisor.md has the derivation):

* The chunk pipeline's GPU stages (detect, swap) take `G = detect + swap` ms per frame; its CPU
  stages (decode, paste, encode) take `C` ms per frame and do not depend on the GPU.
* Each GPU g has a time factor f(g): its GPU-stage time relative to the calibration's reference GPU.
  Measured GPUs carry a fitted factor. Any other GPU takes the datasheet ratio against the reference,
  `prior(g) = (tflops_ref / tflops_g) ** a * (bandwidth_ref / bandwidth_g) ** (1 - a)` with
  a = compute_weight, raised to the fitted datasheet elasticity b: f(g) = prior(g) ** b.
* On GPU h the job's GPU stages take `G_h = G * f(h) / f(s)` when it ran on a catalog GPU s, or
  `G_h = f(h) * (w0 + w1 * megapixels + w2 * faces_per_frame)` (the fitted workload model, in
  reference-GPU ms) when it ran on a CPU or an unknown GPU.
* The stages overlap, so only a share phi (the fitted wall factor) of a change in stage time shows in
  the wall time: `T_h = max(T + phi * frames * (G_h - G) / 1000, min(T, phi * frames * C / 1000))`,
  T being the measured wall time; the floor keeps the CPU stages' share when the GPU part vanishes.

`fit_calibration` fits f for each measured GPU, the workload and memory models, phi and b by
linear least squares (numpy) on profiles of the same jobs measured on several GPUs; weak prior rows
keep every parameter defined when the measurements cannot identify it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.advisor.job_profile import JobProfile
from services.common.errors import InvalidArgument, NotFound
from services.common.gpu_catalog import GIB, GpuCatalog, GpuSpec

PACKAGED_CALIBRATION = Path(__file__).with_name("calibration.json")
PRIOR_REFERENCE_GPU = "H100 80GB SXM"
# Weights of the prior rows against one measurement row; small, so data decides wherever it can.
_FACTOR_PRIOR_WEIGHT = 0.01
_COEFFICIENT_PRIOR_WEIGHT = 0.01
# The prior elasticity counts like one GPU measured with a datasheet ratio of e**0.5 (1.65x).
_ELASTICITY_PRIOR_WEIGHT = 0.5
# The prior wall factor counts like one job pair whose GPU-stage time differs by 5% of the mean wall time.
_WALL_FACTOR_PRIOR_SHARE = 0.05
_MIN_GPU_STAGE_MS = 0.01


@dataclass(frozen=True)
class WorkloadModel:
    """GPU-stage ms per frame on the reference GPU, from what the job is made of."""

    base_ms: float
    ms_per_megapixel: float
    ms_per_face: float

    def ms(self, profile: JobProfile) -> float:
        value = self.base_ms + self.ms_per_megapixel * profile.megapixels + self.ms_per_face * profile.faces_per_frame
        return max(value, _MIN_GPU_STAGE_MS)


@dataclass(frozen=True)
class MemoryModel:
    """Peak GPU memory of a job, for profiles measured without a GPU."""

    base_bytes: float
    bytes_per_megapixel: float
    bytes_per_face: float

    def peak_bytes(self, profile: JobProfile) -> int:
        value = self.base_bytes + self.bytes_per_megapixel * profile.megapixels
        return max(round(value + self.bytes_per_face * profile.faces_per_frame), 0)


@dataclass(frozen=True)
class Calibration:
    reference_gpu: str
    reference_fp16_tensor_tflops: float
    reference_memory_bandwidth_gbps: float
    # Catalog GPU name -> its GPU-stage time relative to the reference GPU, for measured GPUs.
    time_factors: Mapping[str, float]
    compute_weight: float
    datasheet_elasticity: float
    wall_factor: float
    workload: WorkloadModel
    memory: MemoryModel
    measurements: int
    note: str
    jobs: tuple[str, ...] = field(default=())
    # GPUs of one machine -> measured end-to-end throughput over one GPU of it (2 -> 1.85: two GPUs made 1.85x
    # the frames a second). Only measured counts: a count missing here has no prediction.
    gpu_scaling: Mapping[int, float] = field(default_factory=dict)

    def is_measured(self, gpu: GpuSpec) -> bool:
        """Whether the GPU's time factor was fitted on measurements rather than taken from datasheets."""
        return self.measurements > 0 and gpu.name in self.time_factors


def datasheet_ratio(gpu: GpuSpec, calibration: Calibration) -> float:
    """The GPU's time relative to the reference from datasheet throughput alone."""
    weight = calibration.compute_weight
    compute = calibration.reference_fp16_tensor_tflops / gpu.fp16_tensor_tflops
    bandwidth = calibration.reference_memory_bandwidth_gbps / gpu.memory_bandwidth_gbps
    return float(compute**weight * bandwidth ** (1.0 - weight))


def time_factor(gpu: GpuSpec, calibration: Calibration) -> float:
    measured = calibration.time_factors.get(gpu.name)
    if measured is not None:
        return measured
    return float(datasheet_ratio(gpu, calibration) ** calibration.datasheet_elasticity)


def predict_gpu_stage_ms(
    profile: JobProfile, gpu: GpuSpec, calibration: Calibration, source_gpu: GpuSpec | None = None
) -> float:
    if source_gpu is not None and profile.gpu_stage_ms > 0:
        return profile.gpu_stage_ms * time_factor(gpu, calibration) / time_factor(source_gpu, calibration)
    return time_factor(gpu, calibration) * calibration.workload.ms(profile)


def predict_seconds(
    profile: JobProfile, gpu: GpuSpec, calibration: Calibration, source_gpu: GpuSpec | None = None
) -> float:
    """Wall time of the profiled job on `gpu`; `source_gpu`: the catalog GPU it ran on (None: CPU/unknown)."""
    stage_ms = predict_gpu_stage_ms(profile, gpu, calibration, source_gpu)
    phi = calibration.wall_factor
    shifted = profile.wall_seconds + phi * profile.frames * (stage_ms - profile.gpu_stage_ms) / 1000.0
    floor = min(profile.wall_seconds, phi * profile.frames * profile.cpu_stage_ms / 1000.0)
    return max(shifted, floor, 1e-3)


def predict_peak_memory_bytes(profile: JobProfile, calibration: Calibration) -> int:
    """The measured peak when the job ran on a GPU; the memory model's estimate when it did not."""
    if profile.gpu_model and profile.memory_peak_bytes > 0:
        return profile.memory_peak_bytes
    return calibration.memory.peak_bytes(profile)


def prior_calibration(catalog: GpuCatalog, reference_gpu: str = PRIOR_REFERENCE_GPU) -> Calibration:
    """Datasheet ratios only, and rough workload and memory guesses: what ships until measurements exist."""
    reference = catalog.named(reference_gpu)
    return Calibration(
        reference_gpu=reference.name,
        reference_fp16_tensor_tflops=reference.fp16_tensor_tflops,
        reference_memory_bandwidth_gbps=reference.memory_bandwidth_gbps,
        time_factors={reference.name: 1.0},
        compute_weight=0.5,
        datasheet_elasticity=1.0,
        wall_factor=1.0,
        workload=WorkloadModel(base_ms=2.0, ms_per_megapixel=2.0, ms_per_face=1.5),
        memory=MemoryModel(base_bytes=1.0 * GIB, bytes_per_megapixel=0.3 * GIB, bytes_per_face=0.05 * GIB),
        measurements=0,
        note=(
            "PRIOR, not measured: GPU time factors are datasheet ratios against the reference GPU; the "
            "workload and memory coefficients are rough guesses. Replace with a fit of real measurements."
        ),
    )


@dataclass(frozen=True)
class _Measured:
    profile: JobProfile
    gpu: GpuSpec


def measured_gpu(profile: JobProfile, catalog: GpuCatalog) -> GpuSpec:
    """The catalog entry of the GPU a measured job ran on; a measurement on a GPU the catalog lacks is an error."""
    gpu = catalog.find(profile.gpu_model)
    if gpu is None:
        raise InvalidArgument(
            f"measurement of job {profile.job_id!r} ran on {profile.gpu_model!r}, which no catalog entry "
            "lists in nvml_names"
        )
    return gpu


def _measured_on_catalog(profiles: Sequence[JobProfile], catalog: GpuCatalog) -> list[_Measured]:
    measured: list[_Measured] = []
    for profile in profiles:
        if not profile.gpu_model:
            continue
        gpu = measured_gpu(profile, catalog)
        if profile.gpu_stage_ms <= 0:
            raise InvalidArgument(f"measurement of job {profile.job_id!r} on {gpu.name} has no detect/swap time")
        measured.append(_Measured(profile, gpu))
    if not measured:
        raise InvalidArgument("calibration needs at least one job measured on a catalog GPU")
    return measured


def _solve(rows: list[list[float]], targets: list[float]) -> np.ndarray:
    solution, *_ = np.linalg.lstsq(np.asarray(rows, dtype=float), np.asarray(targets, dtype=float), rcond=None)
    return np.asarray(solution, dtype=float)


def _fit_time_factors(
    measured: Sequence[_Measured], gpus: Sequence[GpuSpec], jobs: Sequence[str], prior: Calibration
) -> tuple[dict[str, float], dict[str, float]]:
    """log G[j, g] = log f(g) + log w(j), with log f(reference) = 0: a two-way least-squares fit.

    Returns the factors per GPU name and each job's GPU-stage ms on the reference GPU.
    """
    free = [gpu for gpu in gpus if gpu.name != prior.reference_gpu]
    columns = len(free) + len(jobs)
    rows: list[list[float]] = []
    targets: list[float] = []
    for item in measured:
        row = [0.0] * columns
        if item.gpu.name != prior.reference_gpu:
            row[free.index(item.gpu)] = 1.0
        row[len(free) + jobs.index(item.profile.job_id)] = 1.0
        rows.append(row)
        targets.append(math.log(item.profile.gpu_stage_ms))
    for position, gpu in enumerate(free):
        row = [0.0] * columns
        row[position] = _FACTOR_PRIOR_WEIGHT
        rows.append(row)
        targets.append(_FACTOR_PRIOR_WEIGHT * math.log(datasheet_ratio(gpu, prior)))
    solution = _solve(rows, targets)
    factors = {prior.reference_gpu: 1.0, **{gpu.name: math.exp(solution[i]) for i, gpu in enumerate(free)}}
    work = {job: math.exp(solution[len(free) + i]) for i, job in enumerate(jobs)}
    return factors, work


def _fit_linear(features: list[list[float]], values: list[float], prior: Sequence[float]) -> np.ndarray:
    """Least squares pulled weakly towards `prior`: fewer jobs than coefficients still give an answer.

    No coefficient is negative: a job's base time or memory and its cost per megapixel or face cannot be. An
    unconstrained fit of jobs measured on different stacks went below zero (run 25's services jobs against the
    H100's in-process ones: a base of -18 ms a frame, which predicts negative time for a small job without faces).
    """
    rows = [list(row) for row in features]
    targets = list(values)
    for position, value in enumerate(prior):
        row = [0.0] * len(prior)
        row[position] = _COEFFICIENT_PRIOR_WEIGHT
        rows.append(row)
        targets.append(_COEFFICIENT_PRIOR_WEIGHT * value)
    return _solve_non_negative(np.asarray(rows, dtype=float), np.asarray(targets, dtype=float))


def _solve_non_negative(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient at 0 or above: each subset of coefficients left free is solved, and the
    best fit among the non-negative solutions wins (exact for the models' three coefficients)."""
    count = rows.shape[1]
    best = np.zeros(count)
    best_residual = float(np.sum(targets**2))
    for size in range(1, count + 1):
        for free in itertools.combinations(range(count), size):
            solution = np.zeros(count)
            solution[list(free)], *_ = np.linalg.lstsq(rows[:, list(free)], targets, rcond=None)
            residual = float(np.sum((rows @ solution - targets) ** 2))
            if (solution >= 0).all() and residual < best_residual:
                best, best_residual = solution, residual
    return best


def _job_features(profile: JobProfile) -> list[float]:
    return [1.0, profile.megapixels, profile.faces_per_frame]


def _fit_wall_factor(measured: Sequence[_Measured]) -> float:
    """Pairs of one job on two GPUs: wall_h - wall_g = phi * frames * (G_h - G_g) / 1000.

    phi is kept within [0, 1]: in the overlapped pipeline a stage that takes longer can lengthen the
    wall time by at most its own extra time.
    """
    by_job: dict[str, list[JobProfile]] = {}
    for item in measured:
        by_job.setdefault(item.profile.job_id, []).append(item.profile)
    xs: list[float] = []
    ys: list[float] = []
    for runs in by_job.values():
        for first in range(len(runs)):
            for second in range(first + 1, len(runs)):
                a, b = runs[first], runs[second]
                xs.append(a.frames * (b.gpu_stage_ms - a.gpu_stage_ms) / 1000.0)
                ys.append(b.wall_seconds - a.wall_seconds)
    walls = [item.profile.wall_seconds for item in measured]
    weight = _WALL_FACTOR_PRIOR_SHARE * math.sqrt(sum(wall * wall for wall in walls) / len(walls))
    numerator = sum(x * y for x, y in zip(xs, ys, strict=True)) + weight * weight
    denominator = sum(x * x for x in xs) + weight * weight
    return min(max(numerator / denominator, 0.0), 1.0)


def _fit_elasticity(factors: Mapping[str, float], gpus: Sequence[GpuSpec], prior: Calibration) -> float:
    """log f(g) = b * log prior(g) over the measured GPUs, pulled towards b = 1."""
    xs = [math.log(datasheet_ratio(gpu, prior)) for gpu in gpus if gpu.name != prior.reference_gpu]
    ys = [math.log(factors[gpu.name]) for gpu in gpus if gpu.name != prior.reference_gpu]
    weight = _ELASTICITY_PRIOR_WEIGHT
    numerator = sum(x * y for x, y in zip(xs, ys, strict=True)) + weight * weight
    return numerator / (sum(x * x for x in xs) + weight * weight)


def fit_calibration(
    profiles: Sequence[JobProfile], catalog: GpuCatalog, reference_gpu: str | None = None
) -> Calibration:
    """Fits the model to profiles of the same jobs (same job_id) measured on one or more catalog GPUs.

    The reference GPU defaults to the first measured GPU in catalog order. Profiles that ran
    without a GPU are ignored: their stage times say nothing about any GPU.
    """
    measured = _measured_on_catalog(profiles, catalog)
    gpus = [gpu for gpu in catalog.gpus if any(item.gpu is gpu for item in measured)]
    reference = catalog.named(reference_gpu) if reference_gpu else gpus[0]
    if reference not in gpus:
        raise InvalidArgument(f"reference GPU {reference.name} has no measurements")
    prior = prior_calibration(catalog, reference.name)
    jobs = sorted({item.profile.job_id for item in measured})
    factors, work = _fit_time_factors(measured, gpus, jobs, prior)

    first_run = {job: next(item.profile for item in measured if item.profile.job_id == job) for job in jobs}
    features = [_job_features(first_run[job]) for job in jobs]
    workload_prior = (prior.workload.base_ms, prior.workload.ms_per_megapixel, prior.workload.ms_per_face)
    workload = _fit_linear(features, [work[job] for job in jobs], workload_prior)

    with_memory = [item.profile for item in measured if item.profile.memory_peak_bytes > 0]
    memory_prior = (prior.memory.base_bytes, prior.memory.bytes_per_megapixel, prior.memory.bytes_per_face)
    memory = (
        _fit_linear(
            [_job_features(profile) for profile in with_memory],
            [profile.memory_peak_bytes / GIB for profile in with_memory],
            [value / GIB for value in memory_prior],
        )
        * GIB
        if with_memory
        else np.asarray(memory_prior)
    )
    gpu_names = ", ".join(gpu.name for gpu in gpus)
    return Calibration(
        reference_gpu=reference.name,
        reference_fp16_tensor_tflops=reference.fp16_tensor_tflops,
        reference_memory_bandwidth_gbps=reference.memory_bandwidth_gbps,
        time_factors=factors,
        compute_weight=prior.compute_weight,
        datasheet_elasticity=_fit_elasticity(factors, gpus, prior),
        wall_factor=_fit_wall_factor(measured),
        workload=WorkloadModel(*(float(value) for value in workload)),
        memory=MemoryModel(*(float(value) for value in memory)),
        measurements=len(measured),
        note=f"fitted on {len(measured)} measurements of {len(jobs)} jobs on {gpu_names}",
        jobs=tuple(jobs),
    )


def calibration_to_json(calibration: Calibration) -> str:
    data = asdict(calibration)
    data["time_factors"] = dict(calibration.time_factors)
    data["jobs"] = list(calibration.jobs)
    data["gpu_scaling"] = {str(count): speedup for count, speedup in sorted(calibration.gpu_scaling.items())}
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _number(data: Mapping[str, Any], key: str, where: str = "") -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"calibration field '{where}{key}' must be a number, got {value!r}")
    return float(value)


def calibration_from_data(data: Any) -> Calibration:
    if not isinstance(data, Mapping):
        raise InvalidArgument("a calibration must be a JSON object")
    factors = data.get("time_factors")
    if not isinstance(factors, Mapping) or not factors:
        raise InvalidArgument("calibration field 'time_factors' must be a non-empty object")
    for name in factors:
        if _number(factors, name, "time_factors.") <= 0:
            raise InvalidArgument(f"calibration field 'time_factors.{name}' must be positive")
    workload, memory = data.get("workload"), data.get("memory")
    if not isinstance(workload, Mapping) or not isinstance(memory, Mapping):
        raise InvalidArgument("calibration fields 'workload' and 'memory' must be objects")
    reference = data.get("reference_gpu")
    if not isinstance(reference, str) or reference not in factors:
        raise InvalidArgument(f"calibration field 'reference_gpu' must name a GPU in time_factors, got {reference!r}")
    for key in ("reference_fp16_tensor_tflops", "reference_memory_bandwidth_gbps", "compute_weight"):
        if _number(data, key) <= 0:
            raise InvalidArgument(f"calibration field '{key}' must be positive")
    return Calibration(
        reference_gpu=reference,
        reference_fp16_tensor_tflops=_number(data, "reference_fp16_tensor_tflops"),
        reference_memory_bandwidth_gbps=_number(data, "reference_memory_bandwidth_gbps"),
        time_factors={str(name): float(value) for name, value in factors.items()},
        compute_weight=_number(data, "compute_weight"),
        datasheet_elasticity=_number(data, "datasheet_elasticity"),
        wall_factor=_number(data, "wall_factor"),
        workload=WorkloadModel(
            *(_number(workload, key, "workload.") for key in ("base_ms", "ms_per_megapixel", "ms_per_face"))
        ),
        memory=MemoryModel(
            *(_number(memory, key, "memory.") for key in ("base_bytes", "bytes_per_megapixel", "bytes_per_face"))
        ),
        measurements=int(_number(data, "measurements")),
        note=str(data.get("note", "")),
        jobs=tuple(str(job) for job in data.get("jobs", [])),
        gpu_scaling=_gpu_scaling(data.get("gpu_scaling", {})),
    )


def _gpu_scaling(data: Any) -> dict[int, float]:
    """JSON's object keys are strings: {"2": 1.85} -> {2: 1.85}, each count at least 2 and its speed-up positive."""
    if not isinstance(data, Mapping):
        raise InvalidArgument("calibration field 'gpu_scaling' must be an object")
    scaling = {}
    for count in data:
        if not str(count).isdigit() or int(count) < 2:
            raise InvalidArgument(f"calibration field 'gpu_scaling' has GPU count {count!r}; counts are 2 or more")
        speedup = _number(data, count, "gpu_scaling.")
        if speedup <= 0:
            raise InvalidArgument(f"calibration field 'gpu_scaling.{count}' must be positive")
        scaling[int(count)] = speedup
    return scaling


def load_calibration(path: str | Path = "") -> Calibration:
    source = Path(path) if str(path) else PACKAGED_CALIBRATION
    try:
        return calibration_from_data(json.loads(source.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise NotFound(f"calibration {source} does not exist") from None
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"calibration {source} is not valid JSON: {error}") from None

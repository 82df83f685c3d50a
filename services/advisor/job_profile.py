"""A job's measured profile: what the advisor needs from a job report, checked field by field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.common.job_vocabulary import STAGE_NAMES, StageName

# Detect and swap run the neural networks (Triton on the GPU); decode, paste and encode run on CPUs.
GPU_STAGES: tuple[StageName, ...] = ("detect", "swap")
CPU_STAGES: tuple[StageName, ...] = tuple(stage for stage in STAGE_NAMES if stage not in GPU_STAGES)


@dataclass(frozen=True)
class JobProfile:
    job_id: str
    # NVML model name of the GPU the job ran on; "" when it ran without one.
    gpu_model: str
    memory_peak_bytes: int
    memory_p95_bytes: int
    utilization_mean: float  # percent, 0-100
    stage_ms_per_frame: Mapping[StageName, float]
    width: int
    height: int
    faces_per_frame: float
    frames: int
    wall_seconds: float

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def gpu_stage_ms(self) -> float:
        return sum(self.stage_ms_per_frame[stage] for stage in GPU_STAGES)

    @property
    def cpu_stage_ms(self) -> float:
        return sum(self.stage_ms_per_frame[stage] for stage in CPU_STAGES)


def _field(report: Mapping[str, Any], path: str) -> Any:
    value: Any = report
    walked: list[str] = []
    for key in path.split("."):
        walked.append(key)
        if not isinstance(value, Mapping) or key not in value:
            raise InvalidArgument(f"profile field '{'.'.join(walked)}' is missing")
        value = value[key]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(f"profile field '{name}' must be a positive integer, got {value!r}")
    return value


def _non_negative_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"profile field '{name}' must be a non-negative integer, got {value!r}")
    return value


def _non_negative(value: Any, name: str) -> float:
    if not _is_number(value) or value < 0:
        raise InvalidArgument(f"profile field '{name}' must be a non-negative number, got {value!r}")
    return float(value)


def _positive(value: Any, name: str) -> float:
    if not _is_number(value) or value <= 0:
        raise InvalidArgument(f"profile field '{name}' must be a positive number, got {value!r}")
    return float(value)


def _percent(value: Any, name: str) -> float:
    if not _is_number(value) or not 0 <= value <= 100:
        raise InvalidArgument(f"profile field '{name}' must be a percentage in [0, 100], got {value!r}")
    return float(value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"profile field '{name}' must be a string, got {value!r}")
    return value


# Keys of a GPU entry in the report's `gpu` section (services/gateway/job_report.py gpu_statistics).
_PEAK_MEMORY = ("memory_used_peak_bytes",)
_P95_MEMORY = ("memory_used_p95_bytes",)
_MEAN_UTILIZATION = ("utilization_mean_percent", "utilization_mean")


@dataclass(frozen=True)
class _GpuUse:
    model: str
    memory_peak_bytes: int
    memory_p95_bytes: int
    utilization_mean: float


def _reading(gpu: Mapping[str, Any], prefix: str, names: tuple[str, ...]) -> Any:
    """The first of `names` the entry has: the gateway writes the first, the others are older spellings."""
    for name in names:
        if name in gpu:
            return gpu[name]
    raise InvalidArgument(f"profile field '{prefix}.{names[0]}' is missing")


def _gpu_use(report: Mapping[str, Any]) -> _GpuUse:
    """A report without a `gpu` section predates GPU telemetry; like an empty GPU list it means no GPU data.

    A job spread over several GPUs is summarised by the GPU that held the most memory (it decides
    which GPU size the job needs) and the mean utilisation over all of them. A null reading (the
    telemetry source had none) counts as 0: memory is then estimated as for a run without a GPU.
    """
    section = report.get("gpu")
    if section is None:
        return _GpuUse("", 0, 0, 0.0)
    if not isinstance(section, Mapping):
        raise InvalidArgument(f"profile field 'gpu' must be an object, got {section!r}")
    gpus = _field(report, "gpu.gpus")
    if not isinstance(gpus, list):
        raise InvalidArgument(f"profile field 'gpu.gpus' must be a list, got {gpus!r}")
    uses: list[_GpuUse] = []
    for position, gpu in enumerate(gpus):
        prefix = f"gpu.gpus[{position}]"
        if not isinstance(gpu, Mapping):
            raise InvalidArgument(f"profile field '{prefix}' must be an object, got {gpu!r}")
        model = _text(_reading(gpu, prefix, ("model",)), f"{prefix}.model")
        if not model:
            raise InvalidArgument(f"profile field '{prefix}.model' must not be empty")
        peak_value = _reading(gpu, prefix, _PEAK_MEMORY)
        p95_value = _reading(gpu, prefix, _P95_MEMORY)
        utilization_value = _reading(gpu, prefix, _MEAN_UTILIZATION)
        peak = 0 if peak_value is None else _non_negative_int(peak_value, f"{prefix}.{_PEAK_MEMORY[0]}")
        p95 = 0 if p95_value is None else _non_negative_int(p95_value, f"{prefix}.{_P95_MEMORY[0]}")
        if p95 > peak:
            raise InvalidArgument(
                f"profile field '{prefix}.{_P95_MEMORY[0]}' ({p95}) exceeds {_PEAK_MEMORY[0]} ({peak})"
            )
        utilization = (
            0.0 if utilization_value is None else _percent(utilization_value, f"{prefix}.{_MEAN_UTILIZATION[0]}")
        )
        uses.append(_GpuUse(model, peak, p95, utilization))
    if not uses:
        return _GpuUse("", 0, 0, 0.0)
    largest = max(uses, key=lambda use: use.memory_peak_bytes)
    return _GpuUse(
        largest.model,
        largest.memory_peak_bytes,
        max(use.memory_p95_bytes for use in uses),
        sum(use.utilization_mean for use in uses) / len(uses),
    )


def profile_from_report(report: Mapping[str, Any]) -> JobProfile:
    """Reads a job report (services/gateway/job_report.py plus its `gpu` section) as a profile."""
    if not isinstance(report, Mapping):
        raise InvalidArgument(f"a job report must be a JSON object, got {type(report).__name__}")
    job_id = _text(_field(report, "job_id"), "job_id")
    frames = _positive_int(_field(report, "frames"), "frames")
    faces = _non_negative_int(_field(report, "faces"), "faces")
    wall_seconds = _positive(_field(report, "wall_seconds"), "wall_seconds")
    width = _positive_int(_field(report, "target.width"), "target.width")
    height = _positive_int(_field(report, "target.height"), "target.height")
    stage_ms = {
        stage: _non_negative(_field(report, f"stages.{stage}.ms_per_frame"), f"stages.{stage}.ms_per_frame")
        for stage in STAGE_NAMES
    }
    use = _gpu_use(report)
    return JobProfile(
        job_id=job_id,
        gpu_model=use.model,
        memory_peak_bytes=use.memory_peak_bytes,
        memory_p95_bytes=use.memory_p95_bytes,
        utilization_mean=use.utilization_mean,
        stage_ms_per_frame=stage_ms,
        width=width,
        height=height,
        faces_per_frame=faces / frames,
        frames=frames,
        wall_seconds=wall_seconds,
    )


def validate_profile(profile: JobProfile) -> JobProfile:
    """The same range checks for a profile that arrives ready-made (RecommendForProfile)."""
    _positive_int(profile.frames, "frames")
    _positive(profile.wall_seconds, "wall_seconds")
    _positive_int(profile.width, "width")
    _positive_int(profile.height, "height")
    _non_negative(profile.faces_per_frame, "faces_per_frame")
    _non_negative_int(profile.memory_peak_bytes, "memory_peak_bytes")
    _non_negative_int(profile.memory_p95_bytes, "memory_p95_bytes")
    if profile.memory_p95_bytes > profile.memory_peak_bytes:
        raise InvalidArgument(
            f"profile field 'memory_p95_bytes' ({profile.memory_p95_bytes}) exceeds "
            f"memory_peak_bytes ({profile.memory_peak_bytes})"
        )
    _percent(profile.utilization_mean, "utilization_mean")
    for stage in STAGE_NAMES:
        _non_negative(profile.stage_ms_per_frame.get(stage), f"stage_ms_per_frame.{stage}")
    return profile


def profiles_from_reports(reports: Sequence[Mapping[str, Any]]) -> tuple[list[JobProfile], list[str]]:
    """Profiles of the reports that read as one, and for each that does not, its job and the reason."""
    profiles: list[JobProfile] = []
    skipped: list[str] = []
    for report in reports:
        try:
            profiles.append(profile_from_report(report))
        except InvalidArgument as error:
            skipped.append(f"job {report.get('job_id', '?')}: {error.message}")
    return profiles, skipped

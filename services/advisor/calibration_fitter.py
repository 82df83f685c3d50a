"""Fits the time model to GPU measurements and reports predicted against measured time.

    python -m services.advisor.calibration_fitter measurements-h100.json measurements-h200.json \\
        [--write services/advisor/calibration.json]

Each file is a JSON list of entries {"job", "gpu_model", "measured_seconds", "report"} as
tests/gpu/measure_advisor_profiles.py writes them, or as taken from gpu_bench's jobs (services/bench/gpu_bench.py),
and optionally "gpu_count": the GPUs of the machine the job ran on, a whole number from 1 (1 when absent: every
earlier entry ran on one GPU). "report" is the gateway's job report; its job_id names the job, the same in every
entry of the same work, since entries are matched by it.

Entries of one GPU fit the model. For every job measured on two GPU models, the table predicts each GPU's time from the
other GPU's profile three ways: datasheet ratios only, the model fitted on every measurement, and the model fitted
without that job (leave one job out: the honest figure).

Entries with gpu_count n > 1 fit nothing of that model; they give the calibration's gpu_scaling[n]: for each job
measured with one GPU and with n GPUs of the same catalog model, the throughput ratio (frames over the report's
wall_seconds with n GPUs over that with one; each side the median of its runs), and gpu_scaling[n] is the median
of those ratios over the jobs. Where no job was measured both ways, gpu_scaling stays empty, and the summary says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.advisor.job_profile import JobProfile, profile_from_report
from services.advisor.time_predictor import (
    Calibration,
    calibration_to_json,
    fit_calibration,
    measured_gpu,
    predict_seconds,
    prior_calibration,
)
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import GpuCatalog, load_catalog


@dataclass(frozen=True)
class PredictionCheck:
    job_id: str
    from_gpu: str
    to_gpu: str
    measured_seconds: float
    datasheet_seconds: float
    fitted_seconds: float
    # None when the other jobs alone measure no GPU the prediction needs.
    held_out_seconds: float | None


@dataclass(frozen=True)
class Measurement:
    """A measurement file entry: the job's profile, and the GPUs of the machine it ran on."""

    profile: JobProfile
    gpu_count: int


@dataclass(frozen=True)
class ScalingPoint:
    """A job measured with one GPU and with `gpu_count` GPUs of the same model."""

    job_id: str
    gpu: str
    gpu_count: int
    # Frames a second with gpu_count GPUs over frames a second with one.
    speedup: float


def _gpu_count(entry: dict[str, Any], where: str) -> int:
    value = entry.get("gpu_count", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{where} has gpu_count {value!r}; a machine has a whole number of GPUs, at least 1")
    return value


def read_measurements(paths: Sequence[Path]) -> list[Measurement]:
    measurements = []
    for path in paths:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise InvalidArgument(f"{path}: measurements must be a JSON list")
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("report"), dict):
                raise InvalidArgument(f"{path}: measurement {position} has no 'report' object")
            gpu_count = _gpu_count(entry, f"{path}: measurement {position}")
            measurements.append(Measurement(profile_from_report(entry["report"]), gpu_count))
    return measurements


def one_gpu_profiles(measurements: Sequence[Measurement]) -> list[JobProfile]:
    """The profiles the time model is fitted on: the jobs that ran on a machine with one GPU (or none)."""
    return [measurement.profile for measurement in measurements if measurement.gpu_count == 1]


def scaling_points(measurements: Sequence[Measurement], catalog: GpuCatalog) -> list[ScalingPoint]:
    """Per job, catalog GPU and GPU count above one, where the same job on one GPU of that model was measured too."""
    fps: dict[tuple[str, str, int], list[float]] = {}
    for measurement in measurements:
        profile = measurement.profile
        if not profile.gpu_model:
            continue
        key = (profile.job_id, measured_gpu(profile, catalog).name, measurement.gpu_count)
        fps.setdefault(key, []).append(profile.frames / profile.wall_seconds)
    return [
        ScalingPoint(job_id, gpu, gpu_count, statistics.median(several) / statistics.median(one))
        for (job_id, gpu, gpu_count), several in sorted(fps.items())
        if gpu_count > 1 and (one := fps.get((job_id, gpu, 1)))
    ]


def gpu_scaling(points: Sequence[ScalingPoint]) -> dict[int, float]:
    """Per GPU count, the median speed-up over the jobs measured both ways."""
    counts = sorted({point.gpu_count for point in points})
    return {count: statistics.median(point.speedup for point in points if point.gpu_count == count) for count in counts}


def with_gpu_scaling(calibration: Calibration, points: Sequence[ScalingPoint]) -> Calibration:
    """The calibration with the measured multi-GPU scaling, its note saying from how many jobs."""
    scaling = gpu_scaling(points)
    if not scaling:
        return calibration
    measured = "; ".join(
        f"{count} GPUs {speedup:.2f}x one over {sum(1 for point in points if point.gpu_count == count)} job(s)"
        for count, speedup in scaling.items()
    )
    return replace(calibration, gpu_scaling=scaling, note=f"{calibration.note}; {measured}")


def scaling_summary(points: Sequence[ScalingPoint]) -> list[str]:
    if not points:
        return [
            "gpu scaling: none (no job was measured with one GPU and with several of the same model), so "
            "gpu_scaling stays empty and the fleet report's multi-GPU options say 'not measured'"
        ]
    lines = [
        f"gpu scaling: {count} GPUs make {speedup:.3f}x the frames a second of one (the median over the jobs below)"
        for count, speedup in gpu_scaling(points).items()
    ]
    lines += [f"  {point.job_id} on {point.gpu_count} x {point.gpu}: {point.speedup:.3f}x" for point in points]
    return lines


def _held_out(profiles: Sequence[JobProfile], job_id: str, catalog: GpuCatalog, reference: str) -> Calibration | None:
    others = [profile for profile in profiles if profile.job_id != job_id and profile.gpu_model]
    try:
        return fit_calibration(others, catalog, reference)
    except InvalidArgument:
        return None


def prediction_checks(profiles: Sequence[JobProfile], catalog: GpuCatalog) -> tuple[Calibration, list[PredictionCheck]]:
    fitted = fit_calibration(profiles, catalog)
    prior = prior_calibration(catalog, fitted.reference_gpu)
    checks = []
    for job_id in sorted({profile.job_id for profile in profiles if profile.gpu_model}):
        runs = [profile for profile in profiles if profile.job_id == job_id and catalog.find(profile.gpu_model)]
        held_out = _held_out(profiles, job_id, catalog, fitted.reference_gpu)
        for source in runs:
            for target in runs:
                source_gpu, target_gpu = catalog.named(source.gpu_model), catalog.named(target.gpu_model)
                if source_gpu == target_gpu:
                    continue
                checks.append(
                    PredictionCheck(
                        job_id=job_id,
                        from_gpu=source_gpu.name,
                        to_gpu=target_gpu.name,
                        measured_seconds=target.wall_seconds,
                        datasheet_seconds=predict_seconds(source, target_gpu, prior, source_gpu),
                        fitted_seconds=predict_seconds(source, target_gpu, fitted, source_gpu),
                        held_out_seconds=None
                        if held_out is None or target_gpu.name not in held_out.time_factors
                        else predict_seconds(source, target_gpu, held_out, source_gpu),
                    )
                )
    return fitted, checks


def _error(predicted: float | None, measured: float) -> str:
    return "n/a" if predicted is None else f"{100.0 * (predicted - measured) / measured:+.1f}%"


def checks_table(checks: Sequence[PredictionCheck]) -> str:
    lines = [
        "| job | from | to | measured s | datasheet s (err) | fitted s (err) | held-out s (err) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for check in checks:
        held = "n/a" if check.held_out_seconds is None else f"{check.held_out_seconds:.2f}"
        lines.append(
            f"| {check.job_id} | {check.from_gpu} | {check.to_gpu} | {check.measured_seconds:.2f} | "
            f"{check.datasheet_seconds:.2f} ({_error(check.datasheet_seconds, check.measured_seconds)}) | "
            f"{check.fitted_seconds:.2f} ({_error(check.fitted_seconds, check.measured_seconds)}) | "
            f"{held} ({_error(check.held_out_seconds, check.measured_seconds)}) |"
        )
    lines += [
        "",
        "| predicted GPU | mean abs error: datasheet | fitted | held-out |",
        "| --- | ---: | ---: | ---: |",
    ]
    for gpu in sorted({check.to_gpu for check in checks}):
        mine = [check for check in checks if check.to_gpu == gpu]

        def mean_abs(values: list[float | None], measured: list[float]) -> str:
            errors = [abs(v - m) / m * 100.0 for v, m in zip(values, measured, strict=True) if v is not None]
            return f"{statistics.mean(errors):.1f}%" if errors else "n/a"

        measured = [check.measured_seconds for check in mine]
        lines.append(
            f"| {gpu} | {mean_abs([c.datasheet_seconds for c in mine], measured)} | "
            f"{mean_abs([c.fitted_seconds for c in mine], measured)} | "
            f"{mean_abs([c.held_out_seconds for c in mine], measured)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measurements", nargs="+", type=Path)
    parser.add_argument("--catalog", default="", help="GPU catalog YAML (default: the packaged one)")
    parser.add_argument("--write", type=Path, help="write the fitted calibration JSON here")
    args = parser.parse_args(argv)
    catalog = load_catalog(args.catalog)
    measurements = read_measurements(args.measurements)
    fitted, checks = prediction_checks(one_gpu_profiles(measurements), catalog)
    points = scaling_points(measurements, catalog)
    fitted = with_gpu_scaling(fitted, points)
    print(fitted.note)
    factors = ", ".join(f"{name} {factor:.3f}" for name, factor in fitted.time_factors.items())
    print(
        f"time factors: {factors}; wall factor {fitted.wall_factor:.3f}; "
        f"datasheet elasticity {fitted.datasheet_elasticity:.3f}"
    )
    print(checks_table(checks))
    print("\n".join(scaling_summary(points)))
    if args.write:
        args.write.write_text(calibration_to_json(fitted), encoding="utf-8")
        print(f"calibration written to {args.write}")


if __name__ == "__main__":
    main()

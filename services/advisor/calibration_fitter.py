"""Fits the time model to GPU measurements and reports predicted against measured time.

    python -m services.advisor.calibration_fitter measurements-h100.json measurements-h200.json \\
        [--write services/advisor/calibration.json]

Each file is what tests/gpu/measure_advisor_profiles.py writes: a JSON list of
{"job", "gpu_model", "measured_seconds", "report"}. For every job measured on two GPUs, the table
predicts each GPU's time from the other GPU's profile three ways: datasheet ratios only, the model
fitted on every measurement, and the model fitted without that job (leave one job out: the honest
figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.advisor.job_profile import JobProfile, profile_from_report
from services.advisor.time_predictor import (
    Calibration,
    calibration_to_json,
    fit_calibration,
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


def read_measurements(paths: Sequence[Path]) -> list[JobProfile]:
    profiles = []
    for path in paths:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise InvalidArgument(f"{path}: measurements must be a JSON list")
        for position, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("report"), dict):
                raise InvalidArgument(f"{path}: measurement {position} has no 'report' object")
            profiles.append(profile_from_report(entry["report"]))
    return profiles


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
    profiles = read_measurements(args.measurements)
    fitted, checks = prediction_checks(profiles, catalog)
    print(fitted.note)
    factors = ", ".join(f"{name} {factor:.3f}" for name, factor in fitted.time_factors.items())
    print(
        f"time factors: {factors}; wall factor {fitted.wall_factor:.3f}; "
        f"datasheet elasticity {fitted.datasheet_elasticity:.3f}"
    )
    print(checks_table(checks))
    if args.write:
        args.write.write_text(calibration_to_json(fitted), encoding="utf-8")
        print(f"calibration written to {args.write}")


if __name__ == "__main__":
    main()

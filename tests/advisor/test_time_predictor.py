from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from services.advisor.job_profile import JobProfile, profile_from_report
from services.advisor.time_predictor import (
    calibration_from_data,
    calibration_to_json,
    datasheet_ratio,
    fit_calibration,
    load_calibration,
    predict_peak_memory_bytes,
    predict_seconds,
    prior_calibration,
    time_factor,
)
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import GIB, load_catalog
from tests.advisor.recorded_reports import catalog_of, gpu_entry, job_report, measured_calibration

CATALOG = catalog_of(
    gpu_entry("Ref", 80, 4.0, tflops=400.0, bandwidth=4000.0),
    gpu_entry("Mid", 24, 1.0, tflops=100.0, bandwidth=1000.0),
    gpu_entry("Slow", 16, 0.3, tflops=25.0, bandwidth=250.0),
    gpu_entry("Unmeasured", 48, 2.0, tflops=200.0, bandwidth=2000.0),
)
ELASTICITY = 0.8
TRUE_FACTORS = {"Ref": 1.0, "Mid": 4.0**ELASTICITY, "Slow": 16.0**ELASTICITY}
WORKLOAD = (3.0, 4.0, 2.0)  # reference ms: base, per megapixel, per face
MEMORY = (1.5, 0.8, 0.1)  # GiB: base, per megapixel, per face
WALL_FACTOR = 0.7
JOBS = {  # job: (width, height, faces per frame as faces/frames, frames, cpu ms, fixed overhead s)
    "a": (640, 360, 1, 100, 12.0, 1.0),
    "b": (1280, 720, 2, 150, 20.0, 2.0),
    "c": (1920, 1080, 1, 80, 35.0, 1.5),
    "d": (1280, 720, 3, 120, 22.0, 0.5),
}


def _synthetic_profiles(
    workload: tuple[float, float, float] = WORKLOAD, memory_gib: tuple[float, float, float] = MEMORY
) -> list[JobProfile]:
    """What the pipeline would measure if the model held exactly with the parameters given (those above)."""
    profiles = []
    for job, (width, height, faces, frames, cpu_ms, overhead) in JOBS.items():
        megapixels = width * height / 1e6
        work = workload[0] + workload[1] * megapixels + workload[2] * faces
        memory = round((memory_gib[0] + memory_gib[1] * megapixels + memory_gib[2] * faces) * GIB)
        for gpu, factor in TRUE_FACTORS.items():
            gpu_ms = factor * work
            wall = overhead + WALL_FACTOR * frames * (cpu_ms + gpu_ms) / 1000.0
            stages = {
                "decode": cpu_ms / 2,
                "detect": gpu_ms * 0.4,
                "swap": gpu_ms * 0.6,
                "paste": cpu_ms / 4,
                "encode": cpu_ms / 4,
            }
            report = job_report(
                job,
                gpu_model=f"NVIDIA {gpu}",
                frames=frames,
                faces=faces * frames,
                wall_seconds=wall,
                width=width,
                height=height,
                stage_ms=stages,
                memory_peak_bytes=memory,
            )
            profiles.append(profile_from_report(report))
    return profiles


def test_the_fit_recovers_known_parameters_from_synthetic_measurements() -> None:
    calibration = fit_calibration(_synthetic_profiles(), CATALOG)

    assert calibration.reference_gpu == "Ref"
    assert calibration.measurements == 12
    for gpu, factor in TRUE_FACTORS.items():
        assert calibration.time_factors[gpu] == pytest.approx(factor, rel=1e-3)
    workload = calibration.workload
    assert (workload.base_ms, workload.ms_per_megapixel, workload.ms_per_face) == pytest.approx(WORKLOAD, rel=1e-2)
    memory = calibration.memory
    assert (
        memory.base_bytes / GIB,
        memory.bytes_per_megapixel / GIB,
        memory.bytes_per_face / GIB,
    ) == pytest.approx(MEMORY, rel=1e-2)
    assert calibration.wall_factor == pytest.approx(WALL_FACTOR, rel=1e-2)
    assert calibration.datasheet_elasticity == pytest.approx(ELASTICITY, abs=0.01)


def test_no_fitted_coefficient_goes_below_zero() -> None:
    # Measurements an unconstrained fit explains with a negative base: -2 ms and -0.5 GiB a job.
    calibration = fit_calibration(_synthetic_profiles((-2.0, 9.0, 4.0), (-0.5, 2.0, 0.4)), CATALOG)
    workload, memory = calibration.workload, calibration.memory
    assert workload.base_ms == 0.0 and workload.ms_per_megapixel > 0 and workload.ms_per_face > 0
    assert memory.base_bytes == 0.0 and memory.bytes_per_megapixel > 0 and memory.bytes_per_face > 0


def test_a_fitted_model_predicts_each_measured_run_from_any_other_gpu() -> None:
    profiles = _synthetic_profiles()
    calibration = fit_calibration(profiles, CATALOG)
    by_key = {(p.job_id, p.gpu_model.removeprefix("NVIDIA ")): p for p in profiles}

    for (job, source), profile in by_key.items():
        for target in TRUE_FACTORS:
            predicted = predict_seconds(profile, CATALOG.named(target), calibration, CATALOG.named(source))
            assert predicted == pytest.approx(by_key[(job, target)].wall_seconds, rel=1e-2)


def test_an_unmeasured_gpu_takes_the_datasheet_ratio_raised_to_the_fitted_elasticity() -> None:
    calibration = fit_calibration(_synthetic_profiles(), CATALOG)
    unmeasured = CATALOG.named("Unmeasured")

    assert datasheet_ratio(unmeasured, calibration) == pytest.approx(2.0)
    assert time_factor(unmeasured, calibration) == pytest.approx(2.0**calibration.datasheet_elasticity)
    assert not calibration.is_measured(unmeasured)
    assert calibration.is_measured(CATALOG.named("Mid"))


def test_only_gpu_stages_scale_with_the_gpu() -> None:
    calibration = measured_calibration("Ref", {"Mid": 4.0, "Slow": 8.0}, wall_factor=1.0)
    profile = profile_from_report(
        job_report(
            gpu_model="NVIDIA Mid",
            frames=100,
            wall_seconds=20.0,
            stage_ms={"decode": 50, "detect": 40, "swap": 60, "paste": 25, "encode": 25},
        )
    )

    on_ref = predict_seconds(profile, CATALOG.named("Ref"), calibration, CATALOG.named("Mid"))
    on_slow = predict_seconds(profile, CATALOG.named("Slow"), calibration, CATALOG.named("Mid"))
    on_mid = predict_seconds(profile, CATALOG.named("Mid"), calibration, CATALOG.named("Mid"))

    # GPU part 100 ms/frame on Mid: 25 ms on Ref (-7.5 s over 100 frames), 200 ms on Slow (+10 s).
    assert on_ref == pytest.approx(12.5)
    assert on_slow == pytest.approx(30.0)
    assert on_mid == pytest.approx(20.0)


def test_the_cpu_stages_bound_the_prediction_from_below() -> None:
    calibration = measured_calibration("Ref", {"Mid": 1000.0})
    profile = profile_from_report(
        job_report(
            gpu_model="NVIDIA Mid",
            frames=100,
            wall_seconds=20.0,
            stage_ms={"decode": 50, "detect": 90, "swap": 60, "paste": 25, "encode": 25},
        )
    )

    assert predict_seconds(profile, CATALOG.named("Ref"), calibration, CATALOG.named("Mid")) == pytest.approx(10.0)


def test_a_cpu_run_is_predicted_from_the_workload_model() -> None:
    calibration = measured_calibration("Ref", {"Mid": 4.0})
    profile = profile_from_report(
        job_report(
            gpu_model=None,
            frames=100,
            wall_seconds=60.0,
            width=1000,
            height=1000,
            faces=100,
            stage_ms={"decode": 10, "detect": 300, "swap": 200, "paste": 10, "encode": 10},
        )
    )

    # Workload: 2 + 2 * 1 MP + 1 * 1 face = 5 ms on Ref, 20 ms on Mid; the CPU's 500 ms/frame go.
    assert predict_seconds(profile, CATALOG.named("Mid"), calibration) == pytest.approx(60.0 - 100 * 0.48)
    assert predict_peak_memory_bytes(profile, calibration) == round(1.5 * GIB)


def test_the_fit_rejects_a_gpu_the_catalog_lacks() -> None:
    profile = profile_from_report(job_report(gpu_model="NVIDIA Mystery"))

    with pytest.raises(InvalidArgument, match="'NVIDIA Mystery', which no catalog entry lists"):
        fit_calibration([profile], CATALOG)


def test_the_fit_needs_a_gpu_measurement() -> None:
    with pytest.raises(InvalidArgument, match="at least one job measured on a catalog GPU"):
        fit_calibration([profile_from_report(job_report(gpu_model=None))], CATALOG)


def test_a_calibration_survives_its_json_form(tmp_path: Path) -> None:
    calibration = fit_calibration(_synthetic_profiles(), CATALOG)
    path = tmp_path / "calibration.json"
    path.write_text(calibration_to_json(calibration))

    assert load_calibration(path) == calibration


def test_the_packaged_calibration_loads_and_says_whether_it_is_measured() -> None:
    calibration = load_calibration()
    catalog = load_catalog()

    assert calibration.reference_gpu in {gpu.name for gpu in catalog.gpus}
    if calibration.measurements == 0:
        assert calibration == prior_calibration(catalog)
        assert "PRIOR" in calibration.note


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("wall_factor", "fast", "'wall_factor' must be a number"),
        ("time_factors", {}, "'time_factors' must be a non-empty object"),
        ("reference_gpu", "Nobody", "'reference_gpu' must name a GPU in time_factors"),
        ("workload", None, "'workload' and 'memory' must be objects"),
    ],
)
def test_a_malformed_calibration_is_rejected_naming_the_field(key: str, value: object, message: str) -> None:
    data = json.loads(calibration_to_json(measured_calibration("Ref", {"Mid": 2.0})))
    data[key] = value

    with pytest.raises(InvalidArgument, match=message):
        calibration_from_data(data)


def test_prior_calibration_uses_datasheet_ratios_only() -> None:
    catalog = load_catalog()
    prior = prior_calibration(catalog)
    l4, h100 = catalog.named("L4 24GB"), catalog.named("H100 80GB SXM")

    expected = (h100.fp16_tensor_tflops / l4.fp16_tensor_tflops) ** 0.5 * (
        h100.memory_bandwidth_gbps / l4.memory_bandwidth_gbps
    ) ** 0.5
    assert time_factor(l4, prior) == pytest.approx(expected)
    assert not prior.is_measured(h100)
    assert dataclasses.replace(prior, measurements=1).is_measured(h100)


def test_gpu_scaling_goes_through_json_with_counts_as_keys() -> None:
    calibration = dataclasses.replace(measured_calibration("Ref", {"Mid": 2.0}), gpu_scaling={2: 1.85})
    data = json.loads(calibration_to_json(calibration))
    assert data["gpu_scaling"] == {"2": 1.85}
    assert calibration_from_data(data).gpu_scaling == {2: 1.85}
    del data["gpu_scaling"]
    assert calibration_from_data(data).gpu_scaling == {}


@pytest.mark.parametrize(
    ("scaling", "message"),
    [({"1": 1.0}, "GPU count '1'"), ({"two": 1.8}, "GPU count 'two'"), ({"2": 0}, "'gpu_scaling.2' must be positive")],
)
def test_gpu_scaling_takes_counts_of_two_or_more_and_positive_speedups(scaling: dict[str, float], message: str) -> None:
    data = json.loads(calibration_to_json(measured_calibration("Ref", {"Mid": 2.0})))
    with pytest.raises(InvalidArgument, match=message):
        calibration_from_data({**data, "gpu_scaling": scaling})

"""The calibration fitter's measurement entries and its multi-GPU point (services/advisor/calibration_fitter.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from services.advisor import calibration_fitter
from services.advisor.calibration_fitter import (
    Measurement,
    ScalingPoint,
    gpu_scaling,
    read_measurements,
    scaling_points,
    with_gpu_scaling,
)
from services.advisor.job_profile import profile_from_report
from services.advisor.time_predictor import PACKAGED_CALIBRATION, load_calibration
from services.common.errors import InvalidArgument
from tests.advisor.recorded_reports import catalog_of, gpu_entry, job_report, measured_calibration

CATALOG = catalog_of(gpu_entry("Big", 80, 4.0), gpu_entry("Cheap", 24, 0.4))
SHIPPED = Path(calibration_fitter.__file__).with_name("measurements")
# The files services/advisor/calibration.json is fitted on (docs/advisor.md).
SHIPPED_FILES = [
    SHIPPED / "measurements-nvidia-h100-80gb-hbm3.json",
    SHIPPED / "measurements-nvidia-h200-services.json",
]


def _entry(job_id: str, wall_seconds: float, gpu: str = "Big", **extra: Any) -> dict[str, Any]:
    report = job_report(job_id, gpu_model=f"NVIDIA {gpu}", wall_seconds=wall_seconds)
    return {"job": job_id, "gpu_model": f"NVIDIA {gpu}", "measured_seconds": wall_seconds, "report": report, **extra}


def _measured(job_id: str, wall_seconds: float, gpu_count: int, gpu: str = "Big") -> Measurement:
    return Measurement(profile_from_report(_entry(job_id, wall_seconds, gpu)["report"]), gpu_count)


def _write(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_an_entry_without_gpu_count_ran_on_one_gpu(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.json", [_entry("a", 20.0), _entry("a", 11.0, gpu_count=2)])

    measurements = read_measurements([path])

    assert [(m.profile.job_id, m.profile.wall_seconds, m.gpu_count) for m in measurements] == [
        ("a", 20.0, 1),
        ("a", 11.0, 2),
    ]


@pytest.mark.parametrize("count", [0, -2, 1.5, "2", True, None])
def test_a_gpu_count_that_is_not_a_whole_number_from_one_is_rejected(tmp_path: Path, count: object) -> None:
    path = _write(tmp_path / "m.json", [_entry("a", 20.0), _entry("a", 11.0, gpu_count=count)])

    with pytest.raises(InvalidArgument, match=rf"m.json: measurement 1 has gpu_count {count!r}"):
        read_measurements([path])


def test_two_gpus_scale_by_the_median_over_jobs_measured_both_ways_on_one_model() -> None:
    measurements = [
        # 250 frames each: the throughput ratio is the wall-time ratio.
        _measured("a", 20.0, 1),
        _measured("a", 10.0, 2),  # 2.0x
        _measured("b", 30.0, 1),
        _measured("b", 20.0, 2),  # 1.5x
        _measured("c", 19.0, 1),
        _measured("c", 10.0, 2),  # 1.9x
        _measured("only-two", 5.0, 2),  # never measured on one GPU
        _measured("other-model", 40.0, 1, gpu="Cheap"),
        _measured("other-model", 10.0, 2),  # one Cheap against two Big: not a pair
    ]

    points = scaling_points(measurements, CATALOG)

    assert [(point.job_id, point.gpu, point.gpu_count) for point in points] == [
        ("a", "Big", 2),
        ("b", "Big", 2),
        ("c", "Big", 2),
    ]
    assert [point.speedup for point in points] == pytest.approx([2.0, 1.5, 1.9])
    # The median, not the mean (1.8).
    assert gpu_scaling(points) == {2: pytest.approx(1.9)}


def test_repeated_runs_of_a_side_count_by_their_median() -> None:
    measurements = [
        _measured("a", 20.0, 1),
        _measured("a", 24.0, 1),
        _measured("a", 100.0, 1),
        _measured("a", 12.0, 2),
    ]

    (point,) = scaling_points(measurements, CATALOG)

    assert point.speedup == pytest.approx(24.0 / 12.0)


def test_without_a_job_measured_both_ways_there_is_no_scaling() -> None:
    calibration = measured_calibration("Big", {})
    measurements = [_measured("a", 20.0, 1), _measured("b", 10.0, 2)]

    points = scaling_points(measurements, CATALOG)

    assert points == [] and gpu_scaling(points) == {}
    assert with_gpu_scaling(calibration, points) == calibration


def test_the_scaling_goes_into_the_calibration_and_its_note() -> None:
    calibration = measured_calibration("Big", {})
    points = [ScalingPoint("a", "Big", 2, 1.8), ScalingPoint("b", "Big", 2, 1.9), ScalingPoint("c", "Big", 2, 2.0)]

    scaled = with_gpu_scaling(calibration, points)

    assert scaled.gpu_scaling == {2: pytest.approx(1.9)}
    assert scaled.note == "test; 2 GPUs 1.90x one over 3 job(s)"
    assert replace(scaled, gpu_scaling={}, note="test") == calibration


def test_a_multi_gpu_run_on_a_gpu_outside_the_catalog_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="'NVIDIA Unknown', which no catalog entry lists"):
        scaling_points([_measured("a", 10.0, 2, gpu="Unknown")], CATALOG)


def _two_gpu_runs(path: Path, speedup: float) -> list[dict[str, Any]]:
    """The shipped H200 services jobs again, as if measured on a machine with two H200s `speedup` times faster."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    for entry in entries:
        entry["gpu_count"] = 2
        entry["report"]["wall_seconds"] /= speedup
    return list(entries)


def _fit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    calibration_fitter.main(argv)
    return capsys.readouterr().out


def test_the_fitter_writes_the_two_gpu_point_and_keeps_the_one_gpu_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two_gpus = _write(tmp_path / "x2.json", _two_gpu_runs(SHIPPED_FILES[1], 1.85))
    alone, with_pair = tmp_path / "alone.json", tmp_path / "with-pair.json"

    out_alone = _fit([*map(str, SHIPPED_FILES), "--write", str(alone)], capsys)
    out_pair = _fit([*map(str, SHIPPED_FILES), str(two_gpus), "--write", str(with_pair)], capsys)

    fitted, scaled = load_calibration(alone), load_calibration(with_pair)
    assert fitted.gpu_scaling == {}
    assert "gpu scaling: none (no job was measured with one GPU and with several of the same model)" in out_alone
    assert scaled.gpu_scaling == {2: pytest.approx(1.85)}
    assert "gpu scaling: 2 GPUs make 1.850x the frames a second of one" in out_pair
    assert "  six-people-1080p-20s on 2 x H200 141GB: 1.850x" in out_pair
    # The two-GPU runs fit nothing else: the one-GPU model is the one fitted without them.
    assert replace(scaled, gpu_scaling={}, note=fitted.note) == fitted
    assert scaled.note == f"{fitted.note}; 2 GPUs 1.85x one over 2 job(s)"


def test_the_shipped_measurements_still_fit_the_shipped_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written = tmp_path / "calibration.json"

    _fit([*map(str, SHIPPED_FILES), "--write", str(written)], capsys)

    # Within rounding: least squares on another BLAS may differ in the last bits.
    assert_close(json.loads(written.read_text(encoding="utf-8")), json.loads(PACKAGED_CALIBRATION.read_text("utf-8")))


def assert_close(fitted: Any, shipped: Any) -> None:
    if isinstance(shipped, dict):
        assert sorted(fitted) == sorted(shipped)
        for key, value in shipped.items():
            assert_close(fitted[key], value)
    elif isinstance(shipped, list):
        assert len(fitted) == len(shipped)
        for item, value in zip(fitted, shipped, strict=True):
            assert_close(item, value)
    elif isinstance(shipped, float):
        assert fitted == pytest.approx(shipped, rel=1e-9, abs=1e-6)
    else:
        assert fitted == shipped

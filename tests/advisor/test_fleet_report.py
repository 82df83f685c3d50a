from __future__ import annotations

from dataclasses import replace

import pytest

from services.advisor.fleet_report import MultiGpuOption, build_fleet_report
from services.advisor.job_profile import JobProfile, profile_from_report
from services.common.gpu_catalog import GIB
from tests.advisor.recorded_reports import catalog_of, gpu_entry, job_report, measured_calibration

CATALOG = catalog_of(
    gpu_entry("Big", 80, 4.0),
    gpu_entry("Fast", 24, 2.0),
    gpu_entry("Cheap", 24, 0.4),
    gpu_entry("Small", 8, 0.1),
)
CALIBRATION = measured_calibration("Big", {"Fast": 1.0, "Cheap": 3.0, "Small": 4.0})


def _job(job_id: str, peak_gib: float, gpu_model: str = "NVIDIA Big") -> JobProfile:
    # 250 frames, 50 GPU ms per frame, 20 s on Big: 20 s on Fast, 45 s on Cheap, 57.5 s on Small.
    return profile_from_report(job_report(job_id, gpu_model=gpu_model, memory_peak_bytes=round(peak_gib * GIB)))


def test_fleet_totals_compare_cost_as_run_with_cost_as_recommended() -> None:
    profiles = [
        _job("small-job", 4.0),  # fits all four; Small is cheapest
        _job("mid-job", 20.0),  # 23 GiB with headroom: Big, Fast, Cheap; Cheap is cheapest
        _job("huge-job", 75.0),  # 86.25 GiB: nothing fits
        _job("elsewhere", 30.0, gpu_model="NVIDIA Unknown"),  # ran on a GPU the catalog does not price
    ]

    report = build_fleet_report(profiles, CATALOG, CALIBRATION, 0.15, skipped=["job x: broken"])

    as_run = 2 * 4.0 * 20.0 / 3600  # small-job and mid-job ran 20 s on Big at $4/h
    recommended = 0.1 * 57.5 / 3600 + 0.4 * 45.0 / 3600
    assert report.jobs == 4
    assert report.jobs_compared == 2
    assert report.jobs_unpriced == 1
    assert report.jobs_without_recommendation == 1
    assert report.as_run_cost_usd == pytest.approx(as_run)
    assert report.recommended_cost_usd == pytest.approx(recommended)
    assert report.savings_percent == pytest.approx(100 * (as_run - recommended) / as_run)
    assert report.skipped == ("job x: broken",)

    rows = {row.gpu: row for row in report.rows}
    assert [rows[g].jobs_fitting for g in ("Big", "Fast", "Cheap", "Small")] == [3, 2, 2, 1]
    assert rows["Big"].fit_share == pytest.approx(0.75)
    assert rows["Small"].fit_share == pytest.approx(0.25)
    assert rows["Fast"].mean_predicted_seconds == pytest.approx(20.0)
    assert rows["Cheap"].mean_predicted_seconds == pytest.approx(45.0)
    assert (rows["Small"].jobs_recommended, rows["Cheap"].jobs_recommended, rows["Big"].jobs_recommended) == (
        1,
        1,
        1,
    )
    assert rows["Cheap"].recommended_cost_usd == pytest.approx(0.4 * 45.0 / 3600)
    assert rows["Big"].jobs_run == 3
    assert rows["Big"].as_run_cost_usd == pytest.approx(3 * 4.0 * 20.0 / 3600)
    assert rows["Fast"].jobs_run == 0


def test_an_empty_fleet_reports_zeros() -> None:
    report = build_fleet_report([], CATALOG, CALIBRATION, 0.15)

    assert report.jobs == 0
    assert report.savings_percent == 0.0
    assert all(row.fit_share == 0.0 for row in report.rows)


def _multi_gpu(scaling: dict[int, float]) -> dict[str, MultiGpuOption]:
    # mid-job: 20 GiB fits Big, Fast and Cheap (20 s, 20 s, 45 s on one of each), not Small.
    calibration = replace(CALIBRATION, gpu_scaling=scaling)
    report = build_fleet_report([_job("mid-job", 20.0)], CATALOG, calibration, 0.15)
    return {option.gpu: option for option in report.multi_gpu}


def test_two_smaller_gpus_are_recommended_against_one_bigger_when_the_pair_is_cheaper() -> None:
    options = _multi_gpu({2: 1.8})
    assert sorted(options) == ["Big", "Cheap", "Fast"]
    cheap = options["Cheap"]
    assert (cheap.gpu_count, cheap.jobs_fitting, cheap.scaling) == (2, 1, 1.8)
    assert cheap.predicted_seconds == pytest.approx(25.0)
    assert cheap.cost_usd == pytest.approx(2 * 0.4 * 25.0 / 3600)
    assert (cheap.single_gpu, cheap.recommended) == ("Fast", True)
    assert cheap.single_gpu_cost_usd == pytest.approx(2.0 * 20.0 / 3600)
    assert "2 x Cheap is cheaper" in cheap.reason
    assert "1.80x one GPU, measured" in cheap.reason


def test_one_bigger_gpu_wins_where_the_pair_costs_more() -> None:
    cheap = _multi_gpu({2: 1.0})["Cheap"]
    assert (cheap.single_gpu, cheap.recommended) == ("Cheap", False)
    assert "1 x Cheap is as cheap or cheaper" in cheap.reason


def test_a_pair_faster_than_every_single_gpu_is_recommended_with_none_to_compare() -> None:
    fast = _multi_gpu({2: 1.8})["Fast"]
    assert fast.predicted_seconds == pytest.approx(20.0 / 1.8)
    assert (fast.single_gpu, fast.single_gpu_cost_usd, fast.recommended) == ("", None, True)
    assert "no single GPU is as fast" in fast.reason


def test_without_a_two_gpu_measurement_the_option_says_so_and_predicts_nothing() -> None:
    for scaling in ({}, {3: 2.6}):
        cheap = _multi_gpu(scaling)["Cheap"]
        assert (cheap.scaling, cheap.predicted_seconds, cheap.cost_usd, cheap.recommended) == (None, None, None, False)
        assert cheap.reason == "2 x Cheap: no 2-GPU measurement in the calibration, so no time or cost is predicted"

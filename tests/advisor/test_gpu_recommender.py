from __future__ import annotations

import pytest

from services.advisor.gpu_recommender import recommend_gpu, recommendation_report_section
from services.advisor.job_profile import JobProfile, profile_from_report
from services.advisor.time_predictor import load_calibration
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import GIB, load_catalog
from tests.advisor.recorded_reports import catalog_of, gpu_entry, job_report, measured_calibration

# Big ran the jobs. Fast is quicker than Cheap but costs five times as much per hour.
CATALOG = catalog_of(
    gpu_entry("Big", 80, 4.0),
    gpu_entry("Fast", 24, 2.0),
    gpu_entry("Cheap", 24, 0.4),
    gpu_entry("Small", 8, 0.1),
)
# GPU-stage time relative to Big: Fast 1x, Cheap 3x, Small 4x.
CALIBRATION = measured_calibration("Big", {"Fast": 1.0, "Cheap": 3.0, "Small": 4.0})
# 250 frames at 50 GPU ms per frame in 20 s: Big and Fast 20 s, Cheap 45 s, Small 57.5 s.
STAGES = {"decode": 10.0, "detect": 20.0, "swap": 30.0, "paste": 15.0, "encode": 25.0}


def _profile(peak_gib: float) -> JobProfile:
    return profile_from_report(job_report(memory_peak_bytes=round(peak_gib * GIB), stage_ms=STAGES))


def test_a_gpu_too_small_for_the_peak_memory_is_never_recommended() -> None:
    # 7.5 GiB peak + 15% headroom = 8.6 GiB > Small's 8 GiB, although Small is the cheapest by far.
    recommendation = recommend_gpu(_profile(7.5), CATALOG, CALIBRATION, 0.15)

    small = next(option for option in recommendation.options if option.gpu.name == "Small")
    assert not small.fits
    assert small.cost_usd < min(o.cost_usd for o in recommendation.options if o.gpu.name != "Small")
    assert recommendation.recommended is not None
    assert recommendation.recommended.gpu.name == "Cheap"


def test_without_headroom_the_same_job_fits_the_small_gpu() -> None:
    recommendation = recommend_gpu(_profile(7.5), CATALOG, CALIBRATION, 0.0)

    assert recommendation.recommended is not None
    assert recommendation.recommended.gpu.name == "Small"


def test_a_cheaper_gpu_meeting_the_deadline_wins_over_a_faster_dearer_one() -> None:
    recommendation = recommend_gpu(_profile(4.0), CATALOG, CALIBRATION, 0.15, deadline_seconds=50.0)

    options = {option.gpu.name: option for option in recommendation.options}
    assert options["Fast"].predicted_seconds == pytest.approx(20.0)
    assert options["Cheap"].predicted_seconds == pytest.approx(45.0)
    assert not options["Small"].meets_deadline
    assert recommendation.recommended is not None
    assert recommendation.recommended.gpu.name == "Cheap"
    assert recommendation.recommended.cost_usd == pytest.approx(0.4 * 45.0 / 3600.0)
    assert recommendation.reason == (
        "Cheap: fits (4.0 of 24.0 GiB with 15% headroom), 45 s < 50 s deadline, $0.005000 — "
        "cheapest that fits and meets the deadline"
    )


def test_a_tight_deadline_moves_the_job_to_the_faster_gpu() -> None:
    recommendation = recommend_gpu(_profile(4.0), CATALOG, CALIBRATION, 0.15, deadline_seconds=30.0)

    assert recommendation.recommended is not None
    assert recommendation.recommended.gpu.name == "Fast"


def test_when_no_gpu_meets_the_deadline_the_answer_says_so() -> None:
    recommendation = recommend_gpu(_profile(4.0), CATALOG, CALIBRATION, 0.15, deadline_seconds=5.0)

    assert recommendation.recommended is None
    assert recommendation.reason.startswith("no GPU that fits meets the 5.0 s deadline")
    assert "the fastest that fits" in recommendation.reason
    assert all(not option.meets_deadline for option in recommendation.options)


def test_when_no_gpu_fits_the_answer_says_so() -> None:
    recommendation = recommend_gpu(_profile(75.0), CATALOG, CALIBRATION, 0.15)

    assert recommendation.recommended is None
    assert recommendation.reason.startswith("no catalog GPU fits: the job needs 86.2 GiB")
    assert "the largest, Big, has 80.0 GiB" in recommendation.reason


def test_options_come_cheapest_first_and_the_report_section_lists_them() -> None:
    recommendation = recommend_gpu(_profile(4.0), CATALOG, CALIBRATION, 0.15)
    costs = [option.cost_usd for option in recommendation.options]

    section = recommendation_report_section(recommendation)

    assert costs == sorted(costs)
    assert section["recommended_gpu"] == "Small"
    assert [entry["gpu"] for entry in section["options"]] == [o.gpu.name for o in recommendation.options]


@pytest.mark.parametrize("deadline", [-1.0, float("nan")])
def test_a_bad_deadline_is_rejected(deadline: float) -> None:
    with pytest.raises(InvalidArgument, match="deadline_seconds must be positive"):
        recommend_gpu(_profile(4.0), CATALOG, CALIBRATION, 0.15, deadline_seconds=deadline)


def test_a_cpu_run_gets_an_estimated_memory_need_on_the_packaged_catalog() -> None:
    profile = profile_from_report(job_report(gpu_model=None, stage_ms=STAGES))

    recommendation = recommend_gpu(profile, load_catalog(), load_calibration(), 0.15)

    assert recommendation.memory_estimated
    assert recommendation.recommended is not None
    assert "memory estimated" in recommendation.reason
    assert all(option.memory_needed_bytes > 0 for option in recommendation.options)

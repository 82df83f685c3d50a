from __future__ import annotations

from dataclasses import replace

import pytest

from services.gateway.job_intake import sanitised_filename
from services.gateway.job_service import current_stage, progress_rates
from tests.gateway.gateway_fakes import job_record


def test_rates_are_frames_over_time_since_start_and_eta_from_what_is_left() -> None:
    job = replace(job_record("a", 0.0), state="RUNNING", started_at=100.0, frames_done=50, frames_total=200)
    fps, eta = progress_rates(job, now=110.0)
    assert fps == pytest.approx(5.0)
    assert eta == pytest.approx(30.0)


def test_rates_are_unknown_before_start_or_before_any_frame() -> None:
    queued = job_record("a", 0.0)
    assert progress_rates(queued, now=10.0) == (0.0, -1.0)
    started = replace(queued, state="RUNNING", started_at=5.0, frames_done=0)
    assert progress_rates(started, now=10.0) == (0.0, -1.0)


def test_ended_jobs_measure_up_to_their_end_and_have_nothing_left() -> None:
    job = replace(
        job_record("a", 0.0),
        state="SUCCEEDED",
        started_at=0.0,
        finished_at=20.0,
        frames_done=100,
        frames_total=100,
    )
    assert progress_rates(job, now=1000.0) == (pytest.approx(5.0), 0.0)


def test_stage_is_the_one_most_chunks_report_and_join_while_joining() -> None:
    running = replace(job_record("a", 0.0), state="RUNNING")
    assert current_stage(running, ["swap", "detect", "swap", ""]) == "swap"
    assert current_stage(running, ["detect", "encode"]) == "encode"
    assert current_stage(running, []) == ""
    assert current_stage(replace(running, state="JOINING"), ["swap"]) == "join"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("clip.mp4", "clip.mp4"),
        ("../../etc/passwd", "passwd"),
        ("C:\\videos\\my clip (1).mov", "my_clip_1_.mov"),
        (".hidden.mp4", "hidden.mp4"),
        ("..", "target"),
    ],
)
def test_upload_names_are_reduced_to_a_safe_base_name(name: str, expected: str) -> None:
    assert sanitised_filename(name) == expected

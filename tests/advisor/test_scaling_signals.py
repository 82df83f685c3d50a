from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.advisor.job_profile import profile_from_report
from services.advisor.scaling_signals import (
    compute_signals,
    desired_triton_replicas,
    desired_worker_replicas,
    gpu_busy_seconds_per_frame,
    median_worker_fps,
    per_worker_fps_of_profile,
    per_worker_fps_of_report,
    publish_signals,
)
from tests.advisor.recorded_reports import job_report


@pytest.mark.parametrize(
    ("pending", "fps", "target", "cap", "expected"),
    [
        (3000, 10.0, 60.0, 32, 5),  # 3000 frames / (10 fps * 60 s) = 5 workers
        (3001, 10.0, 60.0, 32, 6),  # one frame more needs a sixth
        (3000, 10.0, 60.0, 4, 4),  # capped
        (0, 10.0, 60.0, 32, 0),  # nothing queued: KEDA's minReplicaCount decides the floor
        (100, 0.0, 60.0, 32, 32),  # no measured throughput: everything allowed
    ],
)
def test_desired_workers(pending: int, fps: float, target: float, cap: int, expected: int) -> None:
    assert desired_worker_replicas(pending, fps, target, cap) == expected


@pytest.mark.parametrize(
    ("pending", "busy", "cap", "expected"),
    [
        (3000, 0.02, 8, 2),  # 60 GPU-seconds / (60 s * 0.8) = 1.25 -> 2
        (2400, 0.02, 8, 1),  # 48 / 48 = 1
        (30000, 0.02, 8, 8),  # 12.5 -> capped at 8
        (10, None, 8, 1),  # no GPU measurement: one replica while work is pending
        (0, 0.02, 8, 0),
    ],
)
def test_desired_triton(pending: int, busy: float | None, cap: int, expected: int) -> None:
    assert desired_triton_replicas(pending, busy, 60.0, 0.8, cap) == expected


def test_per_worker_fps_counts_the_time_chunks_were_worked_on() -> None:
    report = job_report(frames=200)
    report["events"] = [
        {"t": 0.0, "kind": "chunk_start", "chunk": 0, "frame": 0, "faces": None},
        {"t": 1.0, "kind": "chunk_start", "chunk": 1, "frame": 100, "faces": None},
        {"t": 2.0, "kind": "faces_changed", "chunk": 0, "frame": 40, "faces": 2},
        {"t": 4.0, "kind": "chunk_end", "chunk": 0, "frame": 100, "faces": 100},
        {"t": 5.0, "kind": "chunk_end", "chunk": 1, "frame": 200, "faces": 100},
    ]

    # Two chunks of 4 s each: 200 frames / 8 busy seconds, although the job took 5 s.
    assert per_worker_fps_of_report(report) == pytest.approx(25.0)
    assert per_worker_fps_of_report(job_report()) is None


def test_the_slowest_stage_bounds_the_fallback_fps() -> None:
    profile = profile_from_report(
        job_report(stage_ms={"decode": 5, "detect": 20, "swap": 40, "paste": 10, "encode": 8})
    )

    assert per_worker_fps_of_profile(profile) == pytest.approx(25.0)


def test_median_worker_fps_ignores_missing_rates_and_falls_back() -> None:
    assert median_worker_fps([10.0, None, 30.0, 20.0], 5.0) == 20.0
    assert median_worker_fps([None], 5.0) == 5.0


def test_gpu_busy_time_per_frame_comes_from_gpu_runs_only() -> None:
    on_gpu = profile_from_report(job_report("a", utilization_mean=50.0, wall_seconds=20.0, frames=250))
    on_cpu = profile_from_report(job_report("b", gpu_model=None, wall_seconds=100.0, frames=250))

    assert gpu_busy_seconds_per_frame([on_gpu, on_cpu]) == pytest.approx(10.0 / 250)
    assert gpu_busy_seconds_per_frame([on_cpu]) is None


def test_publish_sets_the_gauges() -> None:
    signals = compute_signals(3000, 10.0, 0.02, 60.0, 0.8, 32, 8)

    publish_signals(signals)

    assert REGISTRY.get_sample_value("swapline_advisor_desired_worker_replicas") == 5
    assert REGISTRY.get_sample_value("swapline_advisor_desired_triton_replicas") == 2
    assert REGISTRY.get_sample_value("swapline_advisor_pending_frames") == 3000

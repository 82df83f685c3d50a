from __future__ import annotations

from services.cli.progress_bar import progress_line
from swapline.jobs.v1 import jobs_pb2


def running_event(gpu_utilization_percent: float) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(
        state=jobs_pb2.JOB_STATE_RUNNING,
        stage="swap",
        frames_done=50,
        frames_total=100,
        fps=25.0,
        eta_seconds=2.0,
        chunks_done=1,
        chunks_total=2,
        gpu_utilization_percent=gpu_utilization_percent,
    )


def test_progress_line_shows_gpu_utilisation_when_known_and_keeps_the_eta() -> None:
    line = progress_line(running_event(77.6))
    assert "running swap, GPU 78%, ETA 2 s" in line


def test_progress_line_leaves_unknown_gpu_utilisation_out() -> None:
    line = progress_line(running_event(-1.0))
    assert "GPU" not in line and "running swap, ETA 2 s" in line

"""Autoscaling signals for KEDA or an HPA: how many workers and Triton replicas the queued work calls for.

Formulas (docs/advisor.md):

* desired workers = clamp(ceil(pending_frames / (per_worker_fps * target_seconds)), 0, max_workers)
  where per_worker_fps is the median over recent succeeded jobs of frames / (seconds their chunks
  were being worked on): what one worker pushes through, however many shared the job.
* desired Triton replicas = clamp(ceil(pending_frames * gpu_busy_seconds_per_frame /
  (target_seconds * target_gpu_utilization)), 1 if any frame is pending else 0, max_triton)
  where gpu_busy_seconds_per_frame = sum(utilization_mean / 100 * wall_seconds) / sum(frames) over
  recent jobs that ran on a GPU: the GPU time the measured jobs kept a GPU busy per frame. Without
  GPU measurements, one replica while work is pending.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from services.advisor.job_profile import JobProfile

DESIRED_WORKERS = Gauge(
    "swapline_advisor_desired_worker_replicas",
    "Worker replicas that drain the pending frames within the target time at the measured per-worker fps.",
)
DESIRED_TRITON = Gauge(
    "swapline_advisor_desired_triton_replicas",
    "Triton replicas whose GPUs do the pending frames' measured GPU work within the target time.",
)
PENDING_FRAMES = Gauge("swapline_advisor_pending_frames", "Frames of queued and running jobs not yet done.")
WORKER_FPS = Gauge("swapline_advisor_per_worker_fps", "Measured frames per second one worker sustains.")


@dataclass(frozen=True)
class ScalingSignals:
    pending_frames: int
    per_worker_fps: float
    gpu_busy_seconds_per_frame: float | None
    desired_workers: int
    desired_triton: int


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def desired_worker_replicas(
    pending_frames: int, per_worker_fps: float, target_seconds: float, max_replicas: int
) -> int:
    if pending_frames <= 0:
        return 0
    if per_worker_fps <= 0 or target_seconds <= 0:
        return max_replicas
    return _clamp(math.ceil(pending_frames / (per_worker_fps * target_seconds)), 0, max_replicas)


def desired_triton_replicas(
    pending_frames: int,
    gpu_busy_seconds_per_frame: float | None,
    target_seconds: float,
    target_gpu_utilization: float,
    max_replicas: int,
) -> int:
    if pending_frames <= 0:
        return 0
    if gpu_busy_seconds_per_frame is None or target_seconds <= 0 or target_gpu_utilization <= 0:
        return _clamp(1, 0, max_replicas)
    gpu_seconds = pending_frames * gpu_busy_seconds_per_frame
    return _clamp(math.ceil(gpu_seconds / (target_seconds * target_gpu_utilization)), 1, max_replicas)


def per_worker_fps_of_report(report: Mapping[str, Any]) -> float | None:
    """frames / chunk-busy seconds from the report's chunk_start and chunk_end events; None without them."""
    frames = report.get("frames")
    events = report.get("events")
    if not isinstance(frames, int) or frames <= 0 or not isinstance(events, list):
        return None
    starts: dict[Any, float] = {}
    busy = 0.0
    for event in events:
        if not isinstance(event, Mapping) or not isinstance(event.get("t"), int | float):
            continue
        if event.get("kind") == "chunk_start":
            starts[event.get("chunk")] = float(event["t"])
        elif event.get("kind") == "chunk_end" and event.get("chunk") in starts:
            busy += float(event["t"]) - starts.pop(event.get("chunk"))
    return frames / busy if busy > 0 else None


def per_worker_fps_of_profile(profile: JobProfile) -> float | None:
    """The overlapped pipeline goes no faster than its slowest stage: a fallback bound without events."""
    slowest = max(profile.stage_ms_per_frame.values(), default=0.0)
    return 1000.0 / slowest if slowest > 0 else None


def median_worker_fps(rates: Sequence[float | None], default_fps: float) -> float:
    measured = [rate for rate in rates if rate is not None and rate > 0]
    return statistics.median(measured) if measured else default_fps


def gpu_busy_seconds_per_frame(profiles: Sequence[JobProfile]) -> float | None:
    on_gpu = [profile for profile in profiles if profile.gpu_model]
    frames = sum(profile.frames for profile in on_gpu)
    if frames == 0:
        return None
    return sum(profile.utilization_mean / 100.0 * profile.wall_seconds for profile in on_gpu) / frames


def compute_signals(
    pending_frames: int,
    per_worker_fps: float,
    gpu_busy_per_frame: float | None,
    target_seconds: float,
    target_gpu_utilization: float,
    max_workers: int,
    max_triton: int,
) -> ScalingSignals:
    return ScalingSignals(
        pending_frames=pending_frames,
        per_worker_fps=per_worker_fps,
        gpu_busy_seconds_per_frame=gpu_busy_per_frame,
        desired_workers=desired_worker_replicas(pending_frames, per_worker_fps, target_seconds, max_workers),
        desired_triton=desired_triton_replicas(
            pending_frames, gpu_busy_per_frame, target_seconds, target_gpu_utilization, max_triton
        ),
    )


def publish_signals(signals: ScalingSignals) -> None:
    DESIRED_WORKERS.set(signals.desired_workers)
    DESIRED_TRITON.set(signals.desired_triton)
    PENDING_FRAMES.set(signals.pending_frames)
    WORKER_FPS.set(signals.per_worker_fps)

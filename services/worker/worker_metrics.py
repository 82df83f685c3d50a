"""The worker's Prometheus metrics, updated once per chunk from its ChunkStats."""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter, Histogram

from services.worker.chunk_pipeline import ChunkStats

ChunkOutcome = Literal["completed", "failed", "stopped", "abandoned"]

_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

FRAMES_PROCESSED = Counter("swapline_worker_frames_total", "Frames the worker swapped and encoded.")
FACES_SWAPPED = Counter("swapline_worker_faces_swapped_total", "Faces the worker swapped.")
CHUNK_SECONDS = Histogram(
    "swapline_worker_chunk_seconds", "Wall seconds per completed chunk.", buckets=_SECONDS_BUCKETS
)
STAGE_SECONDS = Histogram(
    "swapline_worker_stage_seconds",
    "Seconds a completed chunk spent in each pipeline stage (stages overlap).",
    ["stage"],
    buckets=_SECONDS_BUCKETS,
)
FP32_FALLBACKS = Counter(
    "swapline_worker_fp32_fallbacks_total",
    "Swapper requests run again on the FP32 twin because the FP16 answer held NaN or Inf.",
)
CHUNKS = Counter("swapline_worker_chunks_total", "Chunks the worker ended, by outcome.", ["outcome"])


def record_completed_chunk(stats: ChunkStats) -> None:
    FRAMES_PROCESSED.inc(stats.frames)
    FACES_SWAPPED.inc(stats.faces)
    FP32_FALLBACKS.inc(stats.fp32_fallbacks)
    CHUNK_SECONDS.observe(max(0.0, stats.finished_at - stats.started_at))
    for stage, seconds in stats.stage_seconds.items():
        STAGE_SECONDS.labels(stage).observe(seconds)
    CHUNKS.labels("completed").inc()


def record_chunk_outcome(outcome: ChunkOutcome) -> None:
    CHUNKS.labels(outcome).inc()

from __future__ import annotations

from prometheus_client import REGISTRY

from services.worker.chunk_pipeline import ChunkStats
from services.worker.worker_metrics import record_completed_chunk


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_a_completed_chunk_counts_its_frames_faces_and_fp32_fallbacks() -> None:
    before = {name: _sample(name) for name in ("swapline_worker_frames_total", "swapline_worker_fp32_fallbacks_total")}
    stats = ChunkStats(fp32_fallbacks=2)
    stats.record_frame(0, 1)
    record_completed_chunk(stats)
    assert _sample("swapline_worker_frames_total") - before["swapline_worker_frames_total"] == 1
    assert _sample("swapline_worker_fp32_fallbacks_total") - before["swapline_worker_fp32_fallbacks_total"] == 2

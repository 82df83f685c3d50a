"""The frame hop benchmark streams every frame through each hop it names, the frame memory's included."""

from __future__ import annotations

import numpy as np
from prometheus_client import REGISTRY

from services.bench.frame_hop import HOPS, measure_hops


def batches_sent_through_frame_memory() -> float:
    value = REGISTRY.get_sample_value("swapline_frame_batches_sent_total", {"way": "frame_memory"})
    return value or 0.0


def test_every_hop_streams_the_frames_and_is_timed() -> None:
    frames = np.arange(10 * 6 * 4, dtype=np.uint64).astype(np.uint8).reshape(10, 6, 4)
    before = batches_sent_through_frame_memory()
    figures = measure_hops(frames, batch_size=4, repeat=1)
    assert list(figures) == [name for name, _, _ in HOPS]
    assert all(figure.wall_ms_per_frame > 0 and figure.cpu_ms_per_frame >= 0 for figure in figures.values())
    # The frame memory hop's 10 frames went as 3 files a stream, over a warm-up stream and one measured.
    assert batches_sent_through_frame_memory() - before == 6

"""A long run must not grow: the DCGM exporter's users report leaks and OOM kills of the DaemonSet."""

from __future__ import annotations

import gc
import logging
import tracemalloc
from pathlib import Path

from prometheus_client import generate_latest

from services.common.gpu_trend_log import TrendLog
from services.exporter.gpu_metrics import exporter_registry
from services.exporter.gpu_recording import RecordedReader
from services.exporter.gpu_sampler import GpuSampler
from services.exporter.pod_attribution import GpuHolders, PodAttributor, PodRef
from tests.exporter.telemetry_fixtures import FakeClock, gpu_process, gpu_sample, outage, record, sweep

WARM_UP_SWEEPS = 1_000
MEASURED_SWEEPS = 10_000
# Sweeps advance the sample time by 40 s, so the measured run crosses four UTC midnights (rotation
# and retention included); every 25th sweep is scraped in full.
SECONDS_PER_SWEEP = 40.0
SCRAPE_EVERY = 25
ALLOWED_GROWTH_BYTES = 256 * 1024
START = 1_710_000_000.0


class RotatingHolders:
    """A kubelet whose pods come and go: every listing names a new pod on GPU 0."""

    def __init__(self) -> None:
        self.listings = 0

    def list_gpu_holders(self) -> GpuHolders:
        self.listings += 1
        return {gpu_sample(0).uuid: (PodRef(namespace="swapline", pod=f"worker-{self.listings}", container="worker"),)}

    def close(self) -> None:
        pass


def test_ten_thousand_sweeps_do_not_grow_memory(tmp_path: Path) -> None:
    # Processes come and go (new PIDs each sweep), GPUs come and go, NVML drops out now and then.
    sweeps = []
    for step in range(50):
        pids = [1000 + (step + offset) % 8 for offset in range(3)] + [5000 + step]
        gpus = [gpu_sample(index, timestamp=0.0, utilization_percent=float(step)) for index in range(step % 3 + 1)]
        sweeps.append(sweep(gpus, [gpu_process(index % len(gpus), pid) for index, pid in enumerate(pids)]))
        if step % 10 == 9:
            sweeps.append(outage(f"NVML read failed: reason {step}"))
            sweeps.append(sweep(gpus, xid=[(0, 79)]))
    sample_time = FakeClock(START)
    reader = RecordedReader(record(tmp_path / "rec.jsonl", sweeps), clock=sample_time)
    clock = FakeClock()
    trend_log = TrendLog(tmp_path / "trend", node="n", retention_days=1)
    attributor = PodAttributor(RotatingHolders(), clock=clock, refresh_seconds=10.0)
    sampler = GpuSampler(reader, node="n", trend_log=trend_log, attributor=attributor, clock=clock)
    registry = exporter_registry(lambda: sampler.snapshot, "n")

    def run(count: int) -> int:
        rendered = 0
        for step in range(count):
            sample_time.advance(SECONDS_PER_SWEEP)
            clock.advance(1.0)
            sampler.sweep()
            if step % SCRAPE_EVERY == 0:
                rendered += len(generate_latest(registry))
        return rendered

    # pytest keeps every captured log record; quiet the exporter so only its own memory is measured.
    exporter_log = logging.getLogger("services.exporter")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    tracemalloc.start()
    try:
        run(WARM_UP_SWEEPS)
        gc.collect()
        before = tracemalloc.take_snapshot()
        rendered = run(MEASURED_SWEEPS)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
        exporter_log.setLevel(level)
        trend_log.close()

    differences = after.compare_to(before, "lineno")
    growth = sum(stat.size_diff for stat in differences)
    largest = "; ".join(str(stat) for stat in differences[:3])
    assert rendered > 0
    assert sampler.snapshot.sweeps_total == WARM_UP_SWEEPS + MEASURED_SWEEPS
    assert len(list((tmp_path / "trend").glob("gpu-trend-*.csv"))) <= 2
    assert growth < ALLOWED_GROWTH_BYTES, f"memory grew by {growth} bytes over {MEASURED_SWEEPS} sweeps: {largest}"

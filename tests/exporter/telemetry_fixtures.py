"""Recorded GPU sweeps and a fake clock for the exporter's off-GPU tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from services.common.gpu_telemetry import GpuProcess, GpuSample
from services.exporter.gpu_recording import RecordedSweep, write_recording

GIB = 1024**3


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gpu_sample(index: int = 0, timestamp: float = 1_700_000_000.0, **overrides: Any) -> GpuSample:
    """A plausible H100 reading; every value differs from the others so a mixed-up field shows."""
    sample = GpuSample(
        timestamp=timestamp,
        index=index,
        uuid=f"GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd",
        model="NVIDIA H100 80GB HBM3",
        utilization_percent=87.0 + index,
        memory_utilization_percent=41.0,
        memory_used_bytes=(20 + index) * GIB,
        memory_total_bytes=80 * GIB,
        memory_reserved_bytes=512 * 1024**2,
        temperature_celsius=61.0,
        power_watts=412.5,
        power_limit_watts=700.0,
        sm_clock_mhz=1980,
        memory_clock_mhz=2619,
        clock_event_reasons=0,
        encoder_utilization_percent=12.0,
        decoder_utilization_percent=7.0,
        pcie_tx_bytes_per_second=3.5e9,
        pcie_rx_bytes_per_second=1.25e9,
        ecc_uncorrected_errors=0,
    )
    return dataclasses.replace(sample, **overrides)


def gpu_process(gpu_index: int, pid: int, used_gib: float = 2.0, sm: float | None = 55.0) -> GpuProcess:
    return GpuProcess(gpu_index=gpu_index, pid=pid, used_memory_bytes=int(used_gib * GIB), sm_utilization_percent=sm)


def sweep(
    samples: Iterable[GpuSample],
    processes: Iterable[GpuProcess] = (),
    xid: Iterable[tuple[int, int]] = (),
    driver_version: str = "550.54.15",
) -> RecordedSweep:
    return RecordedSweep(
        samples=tuple(samples), processes=tuple(processes), xid=tuple(xid), driver_version=driver_version
    )


def outage(reason: str) -> RecordedSweep:
    return RecordedSweep(unavailable_reason=reason)


def record(path: Path, sweeps: Iterable[RecordedSweep]) -> Path:
    return write_recording(path, sweeps)

"""The sampling loop: one thread reads every GPU each interval and publishes an immutable snapshot.

Scrapes only read the latest snapshot, so a scrape never calls NVML and a slow scraper cannot
slow the sampling. When NVML cannot be read the snapshot says so (nvml_up 0 with the reason), the
reason is logged once, and reads are retried with capped exponential backoff.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.gpu_telemetry import (
    DriverVersionSource,
    GpuProcess,
    GpuReader,
    GpuSample,
    GpuUnavailable,
)
from services.common.gpu_trend_log import TrendLog
from services.exporter.pod_attribution import NO_POD, GpuHolders, PodAttributor, PodRef, holders_of

log = logging.getLogger(__name__)

BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
SWEEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# XID codes are small integers; the cap only guards the counter map against a misbehaving driver.
MAX_XID_SERIES = 1024


@dataclass(frozen=True)
class ProcessUsage:
    process: GpuProcess
    gpu_uuid: str
    # The container holding the process's GPU; NO_POD where none does, or where several share it.
    pod: PodRef


@dataclass(frozen=True)
class GpuAllocation:
    """One container holding one GPU; under time-slicing several hold the same GPU."""

    gpu_index: int
    pod: PodRef


@dataclass(frozen=True)
class SweepHistogram:
    bucket_counts: tuple[int, ...] = (0,) * len(SWEEP_SECONDS_BUCKETS)
    count: int = 0
    total_seconds: float = 0.0


@dataclass(frozen=True)
class SweepSnapshot:
    nvml_up: bool = False
    reason: str = "no sweep yet"
    driver_version: str = ""
    samples: tuple[GpuSample, ...] = ()
    processes: tuple[ProcessUsage, ...] = ()
    allocations: tuple[GpuAllocation, ...] = ()
    # (gpu index, xid) -> events seen since the exporter started
    xid_counts: tuple[tuple[tuple[int, int], int], ...] = ()
    sweeps_total: int = 0
    nvml_errors_total: int = 0
    sweep_seconds: SweepHistogram = field(default_factory=SweepHistogram)


def observe(histogram: SweepHistogram, seconds: float) -> SweepHistogram:
    counts = tuple(
        count + (1 if seconds <= bound else 0)
        for count, bound in zip(histogram.bucket_counts, SWEEP_SECONDS_BUCKETS, strict=True)
    )
    return SweepHistogram(counts, histogram.count + 1, histogram.total_seconds + seconds)


def next_backoff(previous: float | None) -> float:
    """1 s, 2 s, 4 s ... capped at 30 s."""
    if previous is None:
        return BACKOFF_INITIAL_SECONDS
    return min(previous * 2.0, BACKOFF_MAX_SECONDS)


def next_due(due: float, now: float, interval: float) -> float:
    """The next tick on the fixed grid due + k * interval that lies after now (missed ticks are skipped)."""
    following = due + interval
    if following > now:
        return following
    return following + (math.floor((now - following) / interval) + 1) * interval


class GpuSampler:
    def __init__(
        self,
        reader: GpuReader,
        *,
        node: str,
        interval_seconds: float = 1.0,
        trend_log: TrendLog | None = None,
        attributor: PodAttributor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be positive, got {interval_seconds}")
        self._reader = reader
        self.node = node
        self._interval = interval_seconds
        self._trend_log = trend_log
        self._attributor = attributor
        self._clock = clock
        self._snapshot = SweepSnapshot()
        self._xid_counts: dict[tuple[int, int], int] = {}
        self._logged_reason: str | None = None
        self._logged_side_error = ""
        self._backoff: float | None = None
        self._running = False
        self._heartbeat = clock()

    @property
    def snapshot(self) -> SweepSnapshot:
        """The latest sweep; replaced whole (one reference assignment), so readers need no lock."""
        return self._snapshot

    @property
    def backoff_seconds(self) -> float | None:
        return self._backoff

    @property
    def stall_seconds(self) -> float:
        """How long the loop may go without a heartbeat before /healthz reports it stalled."""
        return 2.0 * max(self._interval, BACKOFF_MAX_SECONDS) + 5.0

    def loop_alive(self) -> bool:
        return self._running and self._clock() - self._heartbeat <= self.stall_seconds

    def sweep(self) -> bool:
        """Reads every GPU once and publishes the result; False when NVML could not be read."""
        started = self._clock()
        try:
            samples = self._reader.sample_all()
            processes = self._reader.processes()
            xid_events = self._reader.xid_events()
        except GpuUnavailable as error:
            self._mark_down(error.reason)
            return False
        except Exception as error:  # an unexpected reader failure is an outage, never a crash
            self._mark_down(f"{type(error).__name__}: {error}")
            return False
        elapsed = self._clock() - started
        if self._logged_reason is not None:
            log.info("NVML readable again after: %s", self._logged_reason)
            self._logged_reason = None
        previous = self._snapshot
        driver_version = self._reader.driver_version() if isinstance(self._reader, DriverVersionSource) else ""
        holders = self._holders()
        self._snapshot = SweepSnapshot(
            nvml_up=True,
            reason="",
            driver_version=driver_version,
            samples=tuple(samples),
            processes=self._attribute(samples, processes, holders),
            allocations=tuple(
                GpuAllocation(sample.index, pod) for sample in samples for pod in holders_of(holders, sample)
            ),
            xid_counts=self._count_xids(xid_events, previous.xid_counts),
            sweeps_total=previous.sweeps_total + 1,
            nvml_errors_total=previous.nvml_errors_total,
            sweep_seconds=observe(previous.sweep_seconds, elapsed),
        )
        self._write_trend(samples)
        return True

    def _mark_down(self, reason: str) -> None:
        if reason != self._logged_reason:
            log.warning("NVML unavailable, exporting swapline_gpu_nvml_up 0 and retrying: %s", reason)
            self._logged_reason = reason
        previous = self._snapshot
        self._snapshot = SweepSnapshot(
            nvml_up=False,
            reason=reason,
            driver_version=previous.driver_version,
            xid_counts=previous.xid_counts,
            sweeps_total=previous.sweeps_total + 1,
            nvml_errors_total=previous.nvml_errors_total + 1,
            sweep_seconds=previous.sweep_seconds,
        )

    def _holders(self) -> GpuHolders:
        # The attributor answers {} itself when the kubelet cannot answer.
        return self._attributor.holders() if self._attributor is not None else {}

    @staticmethod
    def _attribute(
        samples: list[GpuSample], processes: list[GpuProcess], holders: GpuHolders
    ) -> tuple[ProcessUsage, ...]:
        """Each process with its GPU's UUID and, where exactly one container holds that GPU, that container."""
        by_index = {sample.index: sample for sample in samples}
        usages = []
        for process in processes:
            sample = by_index.get(process.gpu_index)
            gpu_holders = holders_of(holders, sample) if sample is not None else ()
            usages.append(
                ProcessUsage(
                    process=process,
                    gpu_uuid=sample.uuid if sample is not None else "",
                    pod=gpu_holders[0] if len(gpu_holders) == 1 else NO_POD,
                )
            )
        return tuple(usages)

    def _count_xids(
        self, events: list[tuple[int, int]], previous: tuple[tuple[tuple[int, int], int], ...]
    ) -> tuple[tuple[tuple[int, int], int], ...]:
        if not events:
            return previous
        for event in events:
            if event in self._xid_counts or len(self._xid_counts) < MAX_XID_SERIES:
                self._xid_counts[event] = self._xid_counts.get(event, 0) + 1
            log.warning("XID %d on GPU %d", event[1], event[0])
        return tuple(sorted(self._xid_counts.items()))

    def _write_trend(self, samples: list[GpuSample]) -> None:
        if self._trend_log is None:
            return
        try:
            self._trend_log.append(samples)
        except OSError as error:  # a full disk must not stop the metrics
            self._log_side_error(f"trend log write failed: {error}")

    def _log_side_error(self, message: str) -> None:
        if message != self._logged_side_error:
            log.warning("%s", message)
            self._logged_side_error = message

    def run(self, wait: Callable[[float], bool], *, first_delay: float = 0.0) -> None:
        """Sweeps on a fixed grid of the interval until `wait(seconds)` returns True (stop requested).

        The grid does not drift with the sweep's own duration; after a failure the next try waits
        the backoff instead. `first_delay` postpones the first sweep (the caller swept already).
        """
        self._running = True
        self._heartbeat = self._clock()
        try:
            if first_delay > 0 and wait(first_delay):
                return
            due = self._clock()
            while True:
                succeeded = self.sweep()
                now = self._clock()
                self._heartbeat = now
                if succeeded:
                    self._backoff = None
                    due = next_due(due, now, self._interval)
                else:
                    self._backoff = next_backoff(self._backoff)
                    due = now + max(self._backoff, self._interval)
                if wait(due - now):
                    return
        finally:
            self._running = False

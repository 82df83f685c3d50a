"""Where the gateway reads GPU samples for a job: the exporter's trend log or Prometheus.

Samples come from where the exporter publishes them, never from the worker: in a cluster the workers
run on CPU nodes and the GPUs belong to Triton's pods. A source that cannot answer raises Unavailable;
callers turn that into "no samples" and a report warning, never into a failed job.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from services.common.errors import Unavailable
from services.common.gpu_trend_log import TrendRow, read_trend_rows

GpuTrendSourceKind = Literal["none", "trend_log", "prometheus"]
GPU_TREND_SOURCE_KINDS: tuple[GpuTrendSourceKind, ...] = typing.get_args(GpuTrendSourceKind)

# A sample older than this is not "current": the exporter samples every second by default.
LATEST_MAX_AGE_SECONDS = 5.0
PROMETHEUS_STEP_SECONDS = 1.0
# Prometheus refuses a range query of more than 11,000 points per series.
PROMETHEUS_MAX_POINTS = 11_000

Clock = Callable[[], float]


@dataclass(frozen=True)
class GpuUsage:
    """What a progress event carries: mean utilisation and summed memory over the GPUs; -1 when unknown."""

    utilization_percent: float = -1.0
    memory_used_bytes: float = -1.0


UNKNOWN_GPU_USAGE = GpuUsage()


class GpuTrendSource(Protocol):
    async def window(self, start: float, end: float) -> list[TrendRow]:
        """Rows with start <= timestamp <= end, in time order; raises Unavailable."""
        ...

    async def latest(self) -> list[TrendRow]:
        """The newest recent row of each GPU; empty when none is recent. Raises Unavailable."""
        ...


def gpu_key(row: TrendRow) -> tuple[str, int, str]:
    return (row.node, row.gpu_index, row.gpu_uuid)


def latest_per_gpu(rows: Iterable[TrendRow]) -> list[TrendRow]:
    newest: dict[tuple[str, int, str], TrendRow] = {}
    for row in rows:
        key = gpu_key(row)
        if key not in newest or row.timestamp >= newest[key].timestamp:
            newest[key] = row
    return sorted(newest.values(), key=gpu_key)


def gpu_usage(rows: Sequence[TrendRow]) -> GpuUsage:
    utilizations = [row.utilization_percent for row in rows if not math.isnan(row.utilization_percent)]
    memory = [row.memory_used_bytes for row in rows if not math.isnan(row.memory_used_bytes)]
    return GpuUsage(
        utilization_percent=sum(utilizations) / len(utilizations) if utilizations else -1.0,
        memory_used_bytes=float(sum(memory)) if memory else -1.0,
    )


class NoTrendSource:
    """gpu_trend_source = "none": every job reads as a CPU-mode run."""

    async def window(self, start: float, end: float) -> list[TrendRow]:
        return []

    async def latest(self) -> list[TrendRow]:
        return []


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


class TrendLogSource:
    """Reads the exporter's trend log directory (single-node and embedded mode)."""

    def __init__(self, trend_dir: Path, clock: Clock = time.time) -> None:
        self._trend_dir = trend_dir
        self._clock = clock

    def _read(self, start: float, end: float) -> list[TrendRow]:
        try:
            rows = read_trend_rows(self._trend_dir, start, end)
        except OSError as error:
            raise Unavailable(f"cannot read the GPU trend log in {self._trend_dir}: {error}") from error
        return sorted(rows, key=lambda row: (row.timestamp, gpu_key(row)))

    async def window(self, start: float, end: float) -> list[TrendRow]:
        return await asyncio.to_thread(self._read, start, end)

    async def latest(self) -> list[TrendRow]:
        now = self._clock()
        return latest_per_gpu(await self.window(now - LATEST_MAX_AGE_SECONDS, now))


# TrendRow field filled by each exporter metric.
PROMETHEUS_METRICS: dict[str, str] = {
    "swapline_gpu_utilization_percent": "utilization_percent",
    "swapline_gpu_memory_used_bytes": "memory_used_bytes",
    "swapline_gpu_memory_total_bytes": "memory_total_bytes",
    "swapline_gpu_temperature_celsius": "temperature_celsius",
    "swapline_gpu_power_watts": "power_watts",
    "swapline_gpu_decoder_utilization_percent": "decoder_utilization_percent",
    "swapline_gpu_encoder_utilization_percent": "encoder_utilization_percent",
}
_MEASUREMENTS = tuple(PROMETHEUS_METRICS.values())


def split_range(start: float, end: float, step: float, max_points: int) -> list[tuple[float, float]]:
    """Consecutive [start, end] pieces of at most max_points evaluation steps each, sharing no step."""
    span = (max_points - 1) * step
    pieces: list[tuple[float, float]] = []
    piece_start = start
    while piece_start <= end:
        piece_end = min(piece_start + span, end)
        pieces.append((piece_start, piece_end))
        piece_start = piece_end + step
    return pieces


class PrometheusTrendSource:
    """Range queries against Prometheus's HTTP API for the exporter's per-GPU series."""

    def __init__(
        self,
        base_url: str,
        selector: str = "",
        timeout_seconds: float = 10.0,
        clock: Clock = time.time,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._selector = selector.strip().strip("{}")
        self._timeout = timeout_seconds
        self._clock = clock

    def query_text(self, metric: str) -> str:
        return f"{metric}{{{self._selector}}}" if self._selector else metric

    def _query_range(self, query: str, start: float, end: float) -> list[dict[str, Any]]:
        parameters = urllib.parse.urlencode(
            {
                "query": query,
                "start": f"{start:.3f}",
                "end": f"{end:.3f}",
                "step": f"{PROMETHEUS_STEP_SECONDS:g}s",
            }
        )
        url = f"{self._base_url}/api/v1/query_range?{parameters}"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:200]
            raise Unavailable(f"Prometheus at {self._base_url} answered {error.code} to {query!r}: {detail}") from None
        except (OSError, ValueError) as error:
            raise Unavailable(f"Prometheus at {self._base_url} did not answer {query!r}: {error}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            problem = body.get("error", body) if isinstance(body, dict) else body
            raise Unavailable(f"Prometheus at {self._base_url} refused {query!r}: {problem}")
        data = body.get("data", {})
        if data.get("resultType") != "matrix":
            raise Unavailable(f"Prometheus answered {query!r} with {data.get('resultType')!r}, not a matrix")
        return list(data.get("result", []))

    def _read(self, start: float, end: float) -> list[TrendRow]:
        readings: dict[tuple[str, int, str, float], dict[str, float]] = {}
        identity: dict[tuple[str, int, str], str] = {}
        for piece_start, piece_end in split_range(start, end, PROMETHEUS_STEP_SECONDS, PROMETHEUS_MAX_POINTS):
            for metric, measurement in PROMETHEUS_METRICS.items():
                for series in self._query_range(self.query_text(metric), piece_start, piece_end):
                    labels = series.get("metric", {})
                    node, uuid = str(labels.get("node", "")), str(labels.get("uuid", ""))
                    try:
                        index = int(labels.get("gpu", ""))
                    except ValueError:
                        continue
                    identity.setdefault((node, index, uuid), str(labels.get("model", "")))
                    for stamp, value in series.get("values", []):
                        readings.setdefault((node, index, uuid, float(stamp)), {})[measurement] = _float_or_nan(
                            str(value)
                        )
        rows = [
            TrendRow(
                timestamp=stamp,
                node=node,
                gpu_index=index,
                gpu_uuid=uuid,
                gpu_model=identity[(node, index, uuid)],
                **{measurement: values.get(measurement, math.nan) for measurement in _MEASUREMENTS},
            )
            for (node, index, uuid, stamp), values in readings.items()
        ]
        return sorted(rows, key=lambda row: (row.timestamp, gpu_key(row)))

    async def window(self, start: float, end: float) -> list[TrendRow]:
        return await asyncio.to_thread(self._read, start, end)

    async def latest(self) -> list[TrendRow]:
        now = self._clock()
        return latest_per_gpu(await self.window(now - LATEST_MAX_AGE_SECONDS, now))


class CurrentGpuUsage:
    """The GPU usage progress events carry, read at most once per max_age so many watchers cost one read."""

    def __init__(self, source: GpuTrendSource, max_age_seconds: float = 1.0, clock: Clock = time.monotonic):
        self._source = source
        self._max_age = max_age_seconds
        self._clock = clock
        self._read_at = -math.inf
        self._usage = UNKNOWN_GPU_USAGE
        self._lock = asyncio.Lock()

    async def read(self) -> GpuUsage:
        async with self._lock:
            if self._clock() - self._read_at >= self._max_age:
                try:
                    self._usage = gpu_usage(await self._source.latest())
                except Unavailable:
                    self._usage = UNKNOWN_GPU_USAGE
                self._read_at = self._clock()
            return self._usage

from __future__ import annotations

import asyncio
import json
import math
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import Unavailable
from services.gateway.gpu_trend_source import (
    PROMETHEUS_MAX_POINTS,
    CurrentGpuUsage,
    PrometheusTrendSource,
    TrendLogSource,
    TrendRow,
    gpu_usage,
    split_range,
)
from tests.gateway.gateway_fakes import ManualClock

CONTRACT_HEADER = (
    "timestamp,node,gpu_index,gpu_uuid,gpu_model,utilization_percent,memory_used_bytes,"
    "memory_total_bytes,temperature_celsius,power_watts"
)
# 2026-03-01T00:00:00Z: a window around it spans two day files.
MIDNIGHT = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


def contract_line(timestamp: float, gpu: int, utilization: float) -> str:
    return f"{timestamp:.3f},node-a,{gpu},GPU-{gpu},NVIDIA L4,{utilization},{1000 + gpu},24000,55,70.5\n"


def row(timestamp: float, gpu: int, utilization: float, memory: float = 1000.0) -> TrendRow:
    return TrendRow(timestamp, "node-a", gpu, f"GPU-{gpu}", "NVIDIA L4", utilization, memory, 24000.0, 55.0, 70.5)


@pytest.fixture
def trend_dir(tmp_path: Path) -> Path:
    """Two day files in the exporter's format; the newer one ends in a half-written row."""
    directory = tmp_path / "gpu-trend"
    directory.mkdir()
    before = [contract_line(MIDNIGHT - 3 + second, gpu, 10 * second + gpu) for second in range(3) for gpu in (0, 1)]
    after = [contract_line(MIDNIGHT + second, gpu, 50 + second + gpu) for second in range(3) for gpu in (0, 1)]
    (directory / "gpu-trend-2026-02-28.csv").write_text(CONTRACT_HEADER + "\n" + "".join(before))
    partial = f"{MIDNIGHT + 3:.3f},node-a,0,GPU-0,NVI"
    (directory / "gpu-trend-2026-03-01.csv").write_text(CONTRACT_HEADER + "\n" + "".join(after) + partial)
    return directory


def test_trend_log_window_spans_day_files_and_ignores_a_partial_last_line(trend_dir: Path) -> None:
    rows = asyncio.run(TrendLogSource(trend_dir).window(MIDNIGHT - 2, MIDNIGHT + 5))
    assert [(r.timestamp - MIDNIGHT, r.gpu_index) for r in rows] == [
        (-2, 0),
        (-2, 1),
        (-1, 0),
        (-1, 1),
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    first = rows[0]
    assert (first.utilization_percent, first.memory_used_bytes, first.memory_total_bytes) == (
        10.0,
        1000,
        24000,
    )
    assert (first.gpu_uuid, first.gpu_model, first.node, first.power_watts) == (
        "GPU-0",
        "NVIDIA L4",
        "node-a",
        70.5,
    )


def test_trend_log_latest_is_each_gpus_newest_recent_row(trend_dir: Path) -> None:
    clock = ManualClock(MIDNIGHT + 3.5)
    latest = asyncio.run(TrendLogSource(trend_dir, clock).latest())
    assert [(r.gpu_index, r.timestamp - MIDNIGHT, r.utilization_percent) for r in latest] == [
        (0, 2, 52),
        (1, 2, 53),
    ]
    clock.now = MIDNIGHT + 60
    assert asyncio.run(TrendLogSource(trend_dir, clock).latest()) == []


def test_missing_trend_dir_reads_as_no_samples(tmp_path: Path) -> None:
    assert asyncio.run(TrendLogSource(tmp_path / "absent").window(MIDNIGHT, MIDNIGHT + 10)) == []


def test_split_range_keeps_every_piece_under_the_point_limit() -> None:
    pieces = split_range(0.0, 25_000.0, 1.0, 11_000)
    assert pieces == [(0.0, 10_999.0), (11_000.0, 21_999.0), (22_000.0, 25_000.0)]
    assert split_range(5.0, 5.0, 1.0, 11_000) == [(5.0, 5.0)]


@dataclass
class FakePrometheus:
    """Answers /api/v1/query_range like Prometheus: one series per GPU, values on the step grid."""

    values: dict[str, float]
    missing: set[str] = field(default_factory=set)
    fail_with: int = 0
    queries: list[dict[str, str]] = field(default_factory=list)

    def answer(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.queries.append(query)
        if self.fail_with:
            return self.fail_with, {
                "status": "error",
                "error": "query processing would load too many samples",
            }
        metric = query["query"].split("{")[0]
        start, end, step = float(query["start"]), float(query["end"]), float(query["step"].rstrip("s"))
        stamps = [start + step * n for n in range(int((end - start) / step) + 1)]
        series = (
            []
            if metric in self.missing
            else [
                {
                    "metric": {
                        "__name__": metric,
                        "gpu": str(gpu),
                        "uuid": f"GPU-{gpu}",
                        "model": "H100",
                        "node": "n1",
                    },
                    "values": [[stamp, str(self.values[metric] + gpu)] for stamp in stamps],
                }
                for gpu in (0, 1)
            ]
        )
        return 200, {"status": "success", "data": {"resultType": "matrix", "result": series}}


@contextmanager
def serving(fake: FakePrometheus) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            assert url.path == "/api/v1/query_range"
            status, body = fake.answer(dict(urllib.parse.parse_qsl(url.query)))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


METRIC_VALUES = {
    "swapline_gpu_utilization_percent": 60.0,
    "swapline_gpu_memory_used_bytes": 4e9,
    "swapline_gpu_memory_total_bytes": 8e10,
    "swapline_gpu_temperature_celsius": 61.0,
    "swapline_gpu_power_watts": 300.0,
    "swapline_gpu_decoder_utilization_percent": 7.0,
    "swapline_gpu_encoder_utilization_percent": 12.0,
}


def test_prometheus_rows_join_the_exporters_metrics_per_gpu_and_instant() -> None:
    fake = FakePrometheus(dict(METRIC_VALUES))
    with serving(fake) as url:
        rows = asyncio.run(PrometheusTrendSource(url, 'node=~"gpu-node-.*"').window(1000.0, 1002.0))
    assert {query["query"] for query in fake.queries} == {
        f'{metric}{{node=~"gpu-node-.*"}}' for metric in METRIC_VALUES
    }
    assert all(query["step"] == "1s" for query in fake.queries)
    assert [(r.timestamp, r.gpu_index) for r in rows] == [(t, g) for t in (1000.0, 1001.0, 1002.0) for g in (0, 1)]
    second_gpu = rows[1]
    assert (second_gpu.utilization_percent, second_gpu.memory_used_bytes, second_gpu.memory_total_bytes) == (
        61.0,
        4e9 + 1,
        8e10 + 1,
    )
    assert (second_gpu.temperature_celsius, second_gpu.power_watts) == (62.0, 301.0)
    assert (second_gpu.decoder_utilization_percent, second_gpu.encoder_utilization_percent) == (8.0, 13.0)
    assert (second_gpu.node, second_gpu.gpu_uuid, second_gpu.gpu_model) == ("n1", "GPU-1", "H100")


def test_prometheus_splits_a_long_window_and_marks_a_missing_metric_nan() -> None:
    fake = FakePrometheus(dict(METRIC_VALUES), missing={"swapline_gpu_power_watts"})
    end = 1000.0 + PROMETHEUS_MAX_POINTS + 99
    with serving(fake) as url:
        rows = asyncio.run(PrometheusTrendSource(url).window(1000.0, end))
    utilization_queries = [q for q in fake.queries if q["query"] == "swapline_gpu_utilization_percent"]
    spans = [(float(q["start"]), float(q["end"])) for q in utilization_queries]
    assert spans == [(1000.0, 1000.0 + PROMETHEUS_MAX_POINTS - 1), (1000.0 + PROMETHEUS_MAX_POINTS, end)]
    assert len(rows) == 2 * (PROMETHEUS_MAX_POINTS + 100)
    assert len({(r.timestamp, r.gpu_index) for r in rows}) == len(rows)
    assert all(math.isnan(r.power_watts) and r.utilization_percent >= 60 for r in rows)


def test_prometheus_failures_are_unavailable() -> None:
    with (
        serving(FakePrometheus(dict(METRIC_VALUES), fail_with=422)) as url,
        pytest.raises(Unavailable, match="422"),
    ):
        asyncio.run(PrometheusTrendSource(url).window(0.0, 10.0))
    with serving(FakePrometheus(dict(METRIC_VALUES))) as url:
        closed = url
    with pytest.raises(Unavailable, match="did not answer"):
        asyncio.run(PrometheusTrendSource(closed, timeout_seconds=2.0).window(0.0, 10.0))


def test_prometheus_latest_reads_the_recent_seconds() -> None:
    fake = FakePrometheus(dict(METRIC_VALUES))
    with serving(fake) as url:
        latest = asyncio.run(PrometheusTrendSource(url, clock=ManualClock(5000.0)).latest())
    assert [(r.gpu_index, r.timestamp) for r in latest] == [(0, 5000.0), (1, 5000.0)]
    assert float(fake.queries[0]["end"]) == 5000.0 and float(fake.queries[0]["start"]) < 5000.0


def test_gpu_usage_averages_utilisation_and_sums_memory() -> None:
    usage = gpu_usage([row(1, 0, 30.0, memory=100.0), row(1, 1, 90.0, memory=250.0), row(1, 2, math.nan)])
    assert (usage.utilization_percent, usage.memory_used_bytes) == (60.0, 1350.0)
    unknown = gpu_usage([])
    assert unknown.utilization_percent < 0 and unknown.memory_used_bytes < 0


@dataclass
class CountingSource:
    answers: list[list[TrendRow] | Unavailable]
    calls: int = 0

    async def window(self, start: float, end: float) -> list[TrendRow]:
        raise AssertionError("progress reads only the latest rows")

    async def latest(self) -> list[TrendRow]:
        answer = self.answers[self.calls]
        self.calls += 1
        if isinstance(answer, Unavailable):
            raise answer
        return answer


def test_current_usage_reads_the_source_at_most_once_per_max_age() -> None:
    clock = ManualClock(0.0)
    source = CountingSource([[row(1, 0, 40.0)], Unavailable("exporter down"), [row(3, 0, 75.0)]])
    current = CurrentGpuUsage(source, max_age_seconds=1.0, clock=clock)

    async def scenario() -> list[float]:
        readings = [(await current.read()).utilization_percent, (await current.read()).utilization_percent]
        clock.advance(1.0)
        readings.append((await current.read()).utilization_percent)
        clock.advance(1.0)
        readings.append((await current.read()).utilization_percent)
        return readings

    assert asyncio.run(scenario()) == [40.0, 40.0, -1.0, 75.0]
    assert source.calls == 3

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import Unavailable
from services.gateway import job_gpu_trend
from services.gateway.gpu_trend_source import TrendRow
from services.gateway.job_gpu_trend import CPU_MODE_WARNING, WINDOW_MARGIN_SECONDS, JobGpuTrend, JobTrendRecorder
from tests.gateway.test_trend_chart import EVENTS, ORIGIN, png_size, synthetic_rows


@dataclass
class StaticSource:
    rows: list[TrendRow]
    error: Unavailable | None = None
    windows: list[tuple[float, float]] = field(default_factory=list)

    async def window(self, start: float, end: float) -> list[TrendRow]:
        self.windows.append((start, end))
        if self.error is not None:
            raise self.error
        return [row for row in self.rows if start <= row.timestamp <= end]

    async def latest(self) -> list[TrendRow]:
        return []


def test_recorded_trend_writes_chart_and_csv_and_summarises_each_gpu(tmp_path: Path) -> None:
    source = StaticSource(synthetic_rows(30))
    trend = asyncio.run(JobTrendRecorder(source, "trend_log", tmp_path).record("j1", ORIGIN + 5, ORIGIN + 20, EVENTS))
    assert source.windows == [(ORIGIN + 5 - WINDOW_MARGIN_SECONDS, ORIGIN + 20 + WINDOW_MARGIN_SECONDS)]
    assert trend.warnings == ()
    section = trend.section
    assert section["charts"] == {"png": "outputs/j1/gpu_trend.png", "csv": "outputs/j1/gpu_trend.csv"}
    # Seconds 4..21 inclusive of two GPUs.
    assert section["samples"] == 36 and section["source"] == "trend_log"
    assert [(gpu["index"], gpu["samples"]) for gpu in section["gpus"]] == [(0, 18), (1, 18)]
    # GPU 0's NVDEC ran at 30 % + 1 a second, so 34..51 over the window; GPU 1 reported no engines.
    engines = [
        (gpu["decoder_utilization_mean_percent"], gpu["decoder_utilization_peak_percent"]) for gpu in section["gpus"]
    ]
    assert engines == [(42.5, 51.0), (None, None)]
    assert png_size(tmp_path / "outputs/j1/gpu_trend.png") == (1200, 900)
    assert len((tmp_path / "outputs/j1/gpu_trend.csv").read_text().splitlines()) == 37
    assert json.loads(json.dumps(section)) == section


def test_no_samples_is_a_cpu_mode_warning_with_a_chart_that_says_so(tmp_path: Path) -> None:
    trend = asyncio.run(JobTrendRecorder(StaticSource([]), "none", tmp_path).record("j2", ORIGIN, ORIGIN + 3, EVENTS))
    assert trend.warnings == (CPU_MODE_WARNING,)
    assert trend.section["samples"] == 0 and trend.section["gpus"] == []
    assert png_size(tmp_path / "outputs/j2/gpu_trend.png") == (1200, 900)


def test_an_unavailable_source_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    source = StaticSource(synthetic_rows(5), error=Unavailable("Prometheus at http://p:9090 did not answer"))
    trend = asyncio.run(JobTrendRecorder(source, "prometheus", tmp_path).record("j3", ORIGIN, ORIGIN + 3, EVENTS))
    assert len(trend.warnings) == 1 and "prometheus source is unavailable" in trend.warnings[0]
    assert "did not answer" in trend.warnings[0]
    assert trend.section["samples"] == 0 and set(trend.section["charts"]) == {"png", "csv"}


def test_an_unwritable_chart_is_a_warning(tmp_path: Path) -> None:
    # A file where the job's output folder should be: nothing can be written under it.
    (tmp_path / "outputs").write_text("not a folder")
    trend = asyncio.run(
        JobTrendRecorder(StaticSource(synthetic_rows(5)), "trend_log", tmp_path).record("j4", ORIGIN, ORIGIN + 3, [])
    )
    assert trend.section["charts"] == {} and trend.section["samples"] == 10
    assert any("could not be written" in warning for warning in trend.warnings)
    # The report goes to the client: no server path in it.
    assert not any(str(tmp_path) in warning for warning in trend.warnings)


def test_concurrent_jobs_draw_their_charts_on_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawing_threads: set[str] = set()
    draw = job_gpu_trend.draw_trend_chart

    def recording_draw(*arguments: Any) -> None:
        drawing_threads.add(threading.current_thread().name)
        draw(*arguments)

    monkeypatch.setattr(job_gpu_trend, "draw_trend_chart", recording_draw)
    recorder = JobTrendRecorder(StaticSource(synthetic_rows(5)), "trend_log", tmp_path)

    async def burst() -> list[JobGpuTrend]:
        return await asyncio.gather(*(recorder.record(f"j{index}", ORIGIN, ORIGIN + 3, EVENTS) for index in range(8)))

    trends = asyncio.run(burst())
    assert [trend.warnings for trend in trends] == [()] * 8
    assert len(drawing_threads) == 1

"""A finished job's GPU trend: samples over its window, chart and CSV beside its report, the report section.

Nothing here can fail a job: a source that does not answer, or a chart that cannot be written, ends up
as a report warning.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import Unavailable
from services.common.media_paths import writable_media_path
from services.gateway.gpu_trend_source import GpuTrendSource, TrendRow
from services.gateway.job_report import gpu_section
from services.gateway.trend_chart import draw_trend_chart, write_trend_csv

log = logging.getLogger(__name__)

# The exporter samples once a second: a margin of one interval on each side gives a job shorter than
# a second its neighbouring samples instead of none.
WINDOW_MARGIN_SECONDS = 1.0
CPU_MODE_WARNING = "no GPU samples in the job's window: ran in CPU mode"


def gpu_trend_chart_uri(job_id: str) -> str:
    return f"outputs/{job_id}/gpu_trend.png"


def gpu_trend_csv_uri(job_id: str) -> str:
    return f"outputs/{job_id}/gpu_trend.csv"


@dataclass(frozen=True)
class JobGpuTrend:
    section: dict[str, Any]
    warnings: tuple[str, ...]


class JobTrendRecorder:
    def __init__(self, source: GpuTrendSource, source_name: str, media_root: Path) -> None:
        self._source = source
        self._source_name = source_name
        self._media_root = media_root
        # Every chart is drawn on this one thread: matplotlib is not thread-safe, and it opens its font
        # files once per drawing thread, so charts on the shared pool left a gateway holding more open
        # files after each burst of jobs.
        self._chart_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trend-chart")

    async def record(
        self,
        job_id: str,
        started_at: float,
        finished_at: float,
        events: Sequence[Mapping[str, Any]],
        subject: str = "",
    ) -> JobGpuTrend:
        """Writes outputs/<job_id>/gpu_trend.{png,csv}; event times count from started_at. subject names the
        chart's window in its heading (default: the job); a batch passes its id and "batch <id>"."""
        window = (started_at - WINDOW_MARGIN_SECONDS, finished_at + WINDOW_MARGIN_SECONDS)
        warnings: list[str] = []
        no_samples_reason = "CPU mode"
        rows: list[TrendRow] = []
        try:
            rows = await self._source.window(*window)
        except Unavailable as error:
            warnings.append(f"no GPU samples: the {self._source_name} source is unavailable: {error.message}")
            no_samples_reason = f"{self._source_name} source unavailable"
        if not rows and not warnings:
            warnings.append(CPU_MODE_WARNING)
        charts: dict[str, str] = {}
        try:
            chart_path = writable_media_path(self._media_root, gpu_trend_chart_uri(job_id))
            csv_path = writable_media_path(self._media_root, gpu_trend_csv_uri(job_id))
            await asyncio.to_thread(write_trend_csv, csv_path, rows, started_at)
            charts["csv"] = gpu_trend_csv_uri(job_id)
            await asyncio.get_running_loop().run_in_executor(
                self._chart_thread,
                functools.partial(
                    draw_trend_chart,
                    chart_path,
                    rows,
                    events,
                    started_at,
                    finished_at - started_at,
                    f"GPU trend of {subject or f'job {job_id}'}",
                    no_samples_reason,
                ),
            )
            charts["png"] = gpu_trend_chart_uri(job_id)
        except Exception as error:
            # A chart is never worth a failed job, whatever matplotlib or the disk raise.
            log.exception("could not write the GPU trend of job %s", job_id)
            # The report goes to the client: the error's kind only, never its paths.
            warnings.append(f"the GPU trend chart could not be written ({type(error).__name__}; see the gateway's log)")
        return JobGpuTrend(gpu_section(rows, self._source_name, window, charts), tuple(warnings))

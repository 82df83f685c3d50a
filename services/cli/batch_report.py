"""What `swapline batch` leaves beside the outputs: a per-pair report (CSV and JSON) and a throughput chart.

The chart is drawn from the WatchBatch events the CLI saw (kept across re-runs, see batch_resume.py), on a
bare Agg Figure as the gateway's GPU trend chart is, saved without a Software stamp so the same samples
give the same bytes. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, get_args

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.common.media_paths import write_file

PairState = Literal["succeeded", "failed", "cancelled", "skipped"]
PAIR_STATES: tuple[PairState, ...] = get_args(PairState)
# The states a pair may end in for the batch to count as done (exit code 0).
DONE_STATES: frozenset[PairState] = frozenset({"succeeded", "skipped"})

CHART_WIDTH_PIXELS = 1200
CHART_HEIGHT_PIXELS = 700
_DPI = 100
PANEL_TITLES = ("frames a second", "jobs ended")
RATE_WINDOW_SECONDS = 5.0


@dataclass(frozen=True)
class PairOutcome:
    """One target with one source: how it ended. `detail` is the error of a failed job or why a pair was skipped."""

    target: str
    source: str
    output: str
    state: PairState
    frames: int
    fps: float
    seconds: float
    job_id: str
    detail: str


REPORT_COLUMNS: tuple[str, ...] = tuple(field.name for field in fields(PairOutcome))


@dataclass(frozen=True)
class BatchSummary:
    batch_id: str
    name: str
    idempotency_key: str
    outcomes: tuple[PairOutcome, ...]

    def counts(self) -> dict[PairState, int]:
        tally = Counter(outcome.state for outcome in self.outcomes)
        return {state: tally[state] for state in PAIR_STATES}

    def not_done(self) -> tuple[PairOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if outcome.state not in DONE_STATES)


@dataclass(frozen=True)
class ThroughputSample:
    """One WatchBatch event as the chart needs it; `at` in Unix seconds, `fps` the gateway's batch average."""

    at: float
    frames_done: int
    jobs_ended: int
    jobs_failed: int
    fps: float


@dataclass(frozen=True)
class ThroughputChart:
    """What was drawn, so callers and tests can check the chart without comparing pixels."""

    title: str
    panels: tuple[str, ...]
    samples: int
    seconds: float
    peak_recent_fps: float
    width_pixels: int
    height_pixels: int


def write_report_csv(path: Path, outcomes: Sequence[PairOutcome]) -> Path:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(REPORT_COLUMNS)
    for outcome in outcomes:
        writer.writerow(
            [
                outcome.target,
                outcome.source,
                outcome.output,
                outcome.state,
                outcome.frames,
                f"{outcome.fps:.2f}",
                f"{outcome.seconds:.3f}",
                outcome.job_id,
                outcome.detail,
            ]
        )
    return write_file(path, text.getvalue())


def write_report_json(path: Path, summary: BatchSummary) -> Path:
    document = {
        "batch_id": summary.batch_id,
        "name": summary.name,
        "idempotency_key": summary.idempotency_key,
        "counts": summary.counts(),
        "pairs": [asdict(outcome) for outcome in summary.outcomes],
    }
    return write_file(path, json.dumps(document, indent=2) + "\n")


def reports_batch_done(path: Path, key: str) -> bool:
    """Whether the JSON report at `path` is of the batch with `key`, and says every pair ended done."""
    try:
        document = json.loads(path.read_text())
        return bool(
            document["idempotency_key"] == key and all(pair["state"] in DONE_STATES for pair in document["pairs"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def recent_fps(
    samples: Sequence[ThroughputSample], window_seconds: float = RATE_WINDOW_SECONDS
) -> list[tuple[float, float]]:
    """(time, frames a second since the last sample at least `window_seconds` earlier, or the first) at each
    sample after the first; samples in time order.

    Frames arrive a chunk at a time, so the rate between two neighbouring events swings from nothing to a burst.
    """
    times = [sample.at for sample in samples]
    rates = []
    for sample in samples[1:]:
        base = samples[max(bisect_right(times, sample.at - window_seconds) - 1, 0)]
        span = sample.at - base.at
        if span > 0:
            rates.append((sample.at, max(sample.frames_done - base.frames_done, 0) / span))
    return rates


def draw_throughput_chart(path: Path, samples: Sequence[ThroughputSample], heading: str) -> ThroughputChart:
    """Two panels over the batch's time: frames a second (the batch average, and per interval between events),
    and jobs ended (all, and the failed ones)."""
    ordered = sorted(samples, key=lambda sample: sample.at)
    origin = ordered[0].at if ordered else 0.0
    title = heading if ordered else f"{heading}: no progress events seen"
    figure = Figure(figsize=(CHART_WIDTH_PIXELS / _DPI, CHART_HEIGHT_PIXELS / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)
    fps_axis, jobs_axis = figure.subplots(2, 1, sharex=True)
    figure.suptitle(title)
    seconds = [sample.at - origin for sample in ordered]
    rates = recent_fps(ordered)
    fps_axis.plot(seconds, [sample.fps for sample in ordered], label="batch average (gateway)")
    fps_axis.plot(
        [at - origin for at, _ in rates], [rate for _, rate in rates], label=f"over the last {RATE_WINDOW_SECONDS:g} s"
    )
    jobs_axis.step(seconds, [sample.jobs_ended for sample in ordered], where="post", label="ended")
    jobs_axis.step(seconds, [sample.jobs_failed for sample in ordered], where="post", label="failed", color="red")
    for axis, panel in zip((fps_axis, jobs_axis), PANEL_TITLES, strict=True):
        axis.set_ylabel(panel)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
        axis.set_ylim(bottom=0)
    jobs_axis.set_xlabel("seconds since the first event seen")
    span = seconds[-1] if seconds else 0.0
    jobs_axis.set_xlim(0.0, span if span > 0 else 1.0)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=_DPI, metadata={"Software": None})
    write_file(path, image.getvalue())
    return ThroughputChart(
        title=title,
        panels=PANEL_TITLES,
        samples=len(ordered),
        seconds=span,
        peak_recent_fps=max((rate for _, rate in rates), default=0.0),
        width_pixels=CHART_WIDTH_PIXELS,
        height_pixels=CHART_HEIGHT_PIXELS,
    )

"""A job's GPU trend as a PNG chart and a CSV, from trend rows and the report's events.

Drawn on a bare Agg Figure (no pyplot state), so charts render safely from worker threads, and
saved without a Software stamp so the same input gives the same bytes.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from services.gateway.gpu_trend_source import TrendRow, gpu_key

CHART_WIDTH_PIXELS = 1200
CHART_HEIGHT_PIXELS = 900
_DPI = 100
GIB = 1024**3
# Beyond this many events a label per line would be unreadable; the lines are still drawn.
MAX_EVENT_LABELS = 24
PANEL_TITLES = ("utilisation %", "memory GiB", "temperature C", "power W")
TREND_CSV_COLUMNS = (
    "timestamp",
    "seconds",
    "node",
    "gpu",
    "gpu_uuid",
    "gpu_model",
    "utilization_percent",
    "memory_used_bytes",
    "memory_total_bytes",
    "temperature_celsius",
    "power_watts",
    "decoder_utilization_percent",
    "encoder_utilization_percent",
)
# The video engines drawn in the utilisation panel, in each GPU's colour: (name, TrendRow field, marker).
# Markers, not dashes, tell them from the GPU's own line: dashes and dots already mark the events.
ENGINE_LINES = (
    ("NVDEC", "decoder_utilization_percent", "v"),
    ("NVENC", "encoder_utilization_percent", "^"),
)
# About this many markers along an engine's line, however long the job.
_ENGINE_MARKERS = 24
_EVENT_STYLES: dict[str, dict[str, Any]] = {
    # Greys and black, so no event line reads as one of the GPUs' coloured lines.
    "chunk_start": {"color": "dimgray", "linestyle": "--", "linewidth": 0.8},
    "chunk_end": {"color": "darkgray", "linestyle": ":", "linewidth": 1.0},
    "faces_changed": {"color": "black", "linestyle": "-.", "linewidth": 0.8},
}


@dataclass(frozen=True)
class ChartSummary:
    """What was drawn, so callers and tests can check the chart without comparing pixels."""

    title: str
    panels: tuple[str, ...]
    gpu_labels: tuple[str, ...]
    # The video engines with a line for at least one GPU (those whose GPUs reported them).
    engines: tuple[str, ...]
    samples: int
    event_markers: int
    event_labels: tuple[str, ...]
    width_pixels: int
    height_pixels: int


def gpu_label(row: TrendRow, several_nodes: bool) -> str:
    name = f"GPU {row.gpu_index}" + (f" {row.gpu_model}" if row.gpu_model else "")
    return f"{row.node} {name}" if several_nodes else name


def rows_by_gpu(rows: Sequence[TrendRow]) -> dict[tuple[str, int, str], list[TrendRow]]:
    grouped: dict[tuple[str, int, str], list[TrendRow]] = {}
    for row in sorted(rows, key=lambda row: (gpu_key(row), row.timestamp)):
        grouped.setdefault(gpu_key(row), []).append(row)
    return grouped


def event_label(event: Mapping[str, Any]) -> str:
    kind = event["kind"]
    if kind == "faces_changed":
        return f"{event['faces']} faces"
    return f"chunk {event['chunk']} {'start' if kind == 'chunk_start' else 'end'}"


def draw_trend_chart(
    path: Path,
    rows: Sequence[TrendRow],
    events: Sequence[Mapping[str, Any]],
    origin: float,
    duration_seconds: float,
    heading: str,
    no_samples_reason: str = "CPU mode",
) -> ChartSummary:
    """Four stacked panels over the job's window, a line per GPU; events (t from origin) as vertical lines.

    The utilisation panel also draws each GPU's NVDEC and NVENC utilisation where the GPU reported them.
    """
    grouped = rows_by_gpu(rows)
    several_nodes = len({node for node, _, _ in grouped}) > 1
    title = heading if rows else f"{heading}: no GPU samples: {no_samples_reason}"
    figure = Figure(figsize=(CHART_WIDTH_PIXELS / _DPI, CHART_HEIGHT_PIXELS / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(4, 1, sharex=True)
    figure.suptitle(title)

    labels: list[str] = []
    gpu_lines: list[Line2D] = []
    engines: set[str] = set()
    for series in grouped.values():
        label = gpu_label(series[0], several_nodes)
        labels.append(label)
        seconds = [row.timestamp - origin for row in series]
        (line,) = axes[0].plot(seconds, [row.utilization_percent for row in series], label=label)
        gpu_lines.append(line)
        color = line.get_color()
        for engine, field, marker in ENGINE_LINES:
            readings = [getattr(row, field) for row in series]
            if all(math.isnan(reading) for reading in readings):
                continue
            engines.add(engine)
            every = max(1, len(series) // _ENGINE_MARKERS)
            axes[0].plot(seconds, readings, color=color, linewidth=0.8, marker=marker, markersize=4, markevery=every)
        axes[1].plot(seconds, [row.memory_used_bytes / GIB for row in series], color=color)
        axes[1].plot(seconds, [row.memory_total_bytes / GIB for row in series], color=color, linestyle="--")
        axes[2].plot(seconds, [row.temperature_celsius for row in series], color=color)
        axes[3].plot(seconds, [row.power_watts for row in series], color=color)

    sample_seconds = [row.timestamp - origin for row in rows]
    left = min([0.0, *sample_seconds])
    right = max([duration_seconds, *sample_seconds])
    right = right if right > left else left + 1.0
    axes[-1].set_xlim(left, right)
    # Event times come from the workers' clocks; one far outside the window would only squash the chart.
    shown = [event for event in events if str(event["kind"]) in _EVENT_STYLES and left <= float(event["t"]) <= right]
    drawn_labels: list[str] = []
    for event in shown:
        style = _EVENT_STYLES[str(event["kind"])]
        for axis in axes:
            axis.axvline(float(event["t"]), alpha=0.7, **style)
        if len(shown) <= MAX_EVENT_LABELS:
            text = event_label(event)
            drawn_labels.append(text)
            axes[0].text(
                float(event["t"]),
                0.98,
                text,
                transform=axes[0].get_xaxis_transform(),
                rotation=90,
                fontsize=7,
                va="top",
                ha="right",
                color=style["color"],
            )

    axes[-1].set_xlabel("seconds since the job started")
    axes[0].set_ylim(0, 105)
    for axis, panel in zip(axes, PANEL_TITLES, strict=True):
        axis.set_ylabel(panel)
        axis.grid(True, alpha=0.3)
    drawn_engines = tuple(engine for engine, _, _ in ENGINE_LINES if engine in engines)
    handles = [*gpu_lines]
    handles += [
        Line2D([], [], color="black", linewidth=0.8, marker=marker, markersize=4, label=f"{engine} %")
        for engine, _, marker in ENGINE_LINES
        if engine in engines
    ]
    handles += [Line2D([], [], label=kind.replace("_", " "), **style) for kind, style in _EVENT_STYLES.items()]
    # Above the panels, so neither samples nor event labels hide under it.
    axes[0].legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=8, ncol=6, frameon=False)
    if rows:
        memory_handles = [
            Line2D([], [], color="black", label="used"),
            Line2D([], [], color="black", linestyle="--", label="total"),
        ]
        axes[1].legend(handles=memory_handles, loc="upper left", fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})
    return ChartSummary(
        title=title,
        panels=PANEL_TITLES,
        gpu_labels=tuple(labels),
        engines=drawn_engines,
        samples=len(rows),
        event_markers=len(shown),
        event_labels=tuple(drawn_labels),
        width_pixels=CHART_WIDTH_PIXELS,
        height_pixels=CHART_HEIGHT_PIXELS,
    )


def _cell(value: float, integral: bool = False) -> str:
    if math.isnan(value):
        return ""
    return str(int(value)) if integral else f"{value:g}"


def write_trend_csv(path: Path, rows: Sequence[TrendRow], origin: float) -> None:
    """The chart's samples; a reading the source did not have is an empty cell."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(TREND_CSV_COLUMNS)
        for row in sorted(rows, key=lambda row: (row.timestamp, gpu_key(row))):
            writer.writerow(
                [
                    f"{row.timestamp:.3f}",
                    f"{row.timestamp - origin:.3f}",
                    row.node,
                    row.gpu_index,
                    row.gpu_uuid,
                    row.gpu_model,
                    _cell(row.utilization_percent),
                    _cell(row.memory_used_bytes, integral=True),
                    _cell(row.memory_total_bytes, integral=True),
                    _cell(row.temperature_celsius),
                    _cell(row.power_watts),
                    _cell(row.decoder_utilization_percent),
                    _cell(row.encoder_utilization_percent),
                ]
            )

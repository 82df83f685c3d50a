from __future__ import annotations

import csv
import math
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.gateway.gpu_trend_source import TrendRow
from services.gateway.trend_chart import TREND_CSV_COLUMNS, draw_trend_chart, write_trend_csv

ORIGIN = 1_750_000_000.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def synthetic_rows(seconds: int, gpus: int = 2) -> list[TrendRow]:
    """GPU 0 reports NVDEC and NVENC; the others report neither, as a GPU whose NVML cannot."""
    return [
        TrendRow(
            timestamp=ORIGIN + second,
            node="n1",
            gpu_index=gpu,
            gpu_uuid=f"GPU-{gpu}",
            gpu_model="NVIDIA L4",
            utilization_percent=50 + 40 * math.sin(second / 5 + gpu),
            memory_used_bytes=(4 + gpu + second / 10) * 1024**3,
            memory_total_bytes=24 * 1024**3,
            temperature_celsius=45 + second / 4,
            power_watts=40 + second,
            decoder_utilization_percent=30.0 + second if gpu == 0 else math.nan,
            encoder_utilization_percent=60.0 - second if gpu == 0 else math.nan,
        )
        for second in range(seconds)
        for gpu in range(gpus)
    ]


def event(t: float, kind: str, chunk: int, faces: int | None = None) -> dict[str, Any]:
    return {"t": t, "kind": kind, "chunk": chunk, "frame": chunk * 50, "faces": faces}


EVENTS = [
    event(0.0, "chunk_start", 0),
    event(4.0, "faces_changed", 0, faces=2),
    event(9.5, "chunk_end", 0, faces=1),
    event(10.0, "chunk_start", 1),
    event(19.0, "chunk_end", 1, faces=1),
]


def test_chart_has_four_panels_a_line_per_gpu_and_every_event(tmp_path: Path) -> None:
    path = tmp_path / "gpu_trend.png"
    summary = draw_trend_chart(path, synthetic_rows(20), EVENTS, ORIGIN, 19.0, "GPU trend of job j1")
    assert png_size(path) == (1200, 900) == (summary.width_pixels, summary.height_pixels)
    assert summary.title == "GPU trend of job j1"
    assert summary.panels == ("utilisation %", "memory GiB", "temperature C", "power W")
    assert summary.gpu_labels == ("GPU 0 NVIDIA L4", "GPU 1 NVIDIA L4")
    assert summary.engines == ("NVDEC", "NVENC")
    assert summary.samples == 40 and summary.event_markers == len(EVENTS)
    assert summary.event_labels == ("chunk 0 start", "2 faces", "chunk 0 end", "chunk 1 start", "chunk 1 end")


def test_events_outside_the_window_are_left_out(tmp_path: Path) -> None:
    # A worker clock far off puts a chunk a day before the job; drawing it would squash the chart.
    skewed = [*EVENTS, event(-86_400.0, "chunk_start", 2), event(86_400.0, "chunk_end", 2)]
    summary = draw_trend_chart(tmp_path / "c.png", synthetic_rows(20), skewed, ORIGIN, 19.0, "job")
    assert summary.event_markers == len(EVENTS)
    assert "chunk 2 start" not in summary.event_labels


def test_chart_without_samples_still_renders_and_says_cpu_mode(tmp_path: Path) -> None:
    path = tmp_path / "gpu_trend.png"
    summary = draw_trend_chart(path, [], EVENTS, ORIGIN, 19.0, "GPU trend of job j1")
    assert png_size(path) == (1200, 900)
    assert summary.title == "GPU trend of job j1: no GPU samples: CPU mode"
    assert summary.gpu_labels == () and summary.samples == 0 and summary.event_markers == len(EVENTS)
    assert summary.engines == ()


def test_only_the_video_engines_some_gpu_reported_are_drawn(tmp_path: Path) -> None:
    without_nvenc = [replace(row, encoder_utilization_percent=math.nan) for row in synthetic_rows(10)]
    neither = [replace(row, decoder_utilization_percent=math.nan) for row in without_nvenc]
    assert draw_trend_chart(tmp_path / "a.png", without_nvenc, EVENTS, ORIGIN, 19.0, "job").engines == ("NVDEC",)
    assert draw_trend_chart(tmp_path / "b.png", neither, EVENTS, ORIGIN, 19.0, "job").engines == ()


def test_same_input_draws_the_same_bytes(tmp_path: Path) -> None:
    rows = synthetic_rows(10, gpus=1)
    draw_trend_chart(tmp_path / "a.png", rows, EVENTS, ORIGIN, 19.0, "job")
    draw_trend_chart(tmp_path / "b.png", rows, EVENTS, ORIGIN, 19.0, "job")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_many_events_keep_their_lines_but_lose_their_labels(tmp_path: Path) -> None:
    many = [event(float(n), "chunk_start", n) for n in range(40)]
    summary = draw_trend_chart(tmp_path / "c.png", synthetic_rows(40, gpus=1), many, ORIGIN, 40.0, "job")
    assert summary.event_markers == 40 and summary.event_labels == ()


def test_csv_has_one_row_per_gpu_sample_with_seconds_from_the_job_start(tmp_path: Path) -> None:
    rows = synthetic_rows(3)
    gap = TrendRow(ORIGIN + 3.25, "n1", 0, "GPU-0", "NVIDIA L4", 12.5, math.nan, 2048.0, math.nan, 33.0)
    path = tmp_path / "gpu_trend.csv"
    write_trend_csv(path, [gap, *reversed(rows)], ORIGIN + 1.0)
    with path.open() as stream:
        records = list(csv.reader(stream))
    assert tuple(records[0]) == TREND_CSV_COLUMNS
    body = records[1:]
    assert len(body) == 7
    assert [(record[1], record[3]) for record in body] == [
        ("-1.000", "0"),
        ("-1.000", "1"),
        ("0.000", "0"),
        ("0.000", "1"),
        ("1.000", "0"),
        ("1.000", "1"),
        ("2.250", "0"),
    ]
    first = dict(zip(TREND_CSV_COLUMNS, body[0], strict=True))
    assert first["timestamp"] == f"{ORIGIN:.3f}" and first["gpu_uuid"] == "GPU-0"
    assert first["memory_used_bytes"] == str(4 * 1024**3) and first["memory_total_bytes"] == str(24 * 1024**3)
    assert float(first["utilization_percent"]) == rows[0].utilization_percent
    assert (first["temperature_celsius"], first["power_watts"]) == ("45", "40")
    assert (first["decoder_utilization_percent"], first["encoder_utilization_percent"]) == ("30", "60")
    assert (body[1][TREND_CSV_COLUMNS.index("decoder_utilization_percent")], body[1][-1]) == ("", "")
    missing = dict(zip(TREND_CSV_COLUMNS, body[-1], strict=True))
    assert (missing["memory_used_bytes"], missing["temperature_celsius"], missing["memory_total_bytes"]) == (
        "",
        "",
        "2048",
    )

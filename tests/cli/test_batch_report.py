"""The batch report (CSV and JSON), the throughput chart, and the resume record they are drawn from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2

from services.cli.batch_report import (
    CHART_HEIGHT_PIXELS,
    CHART_WIDTH_PIXELS,
    REPORT_COLUMNS,
    BatchSummary,
    PairOutcome,
    ThroughputSample,
    draw_throughput_chart,
    recent_fps,
    write_report_csv,
    write_report_json,
)
from services.cli.batch_resume import RESUME_FILENAME, ResumeLog, ResumeRecord, load_resume, save_resume

DONE = PairOutcome("a.mp4", "x.png", "a__x.mp4", "succeeded", 120, 30.0, 4.0, "job-1", "")
SKIPPED = PairOutcome(
    "a.mp4", "y.png", "a__y.mp4", "skipped", 120, 0.0, 0.0, "", "output exists and is complete: 120 frames, 4.80 s"
)
FAILED = PairOutcome("b.mov", "x.png", "b__x.mov", "failed", 0, 0.0, 1.5, "job-2", "no face found in the target")
SUMMARY = BatchSummary("batch-id", "out", "batch-key", (DONE, SKIPPED, FAILED))


def samples(count: int) -> list[ThroughputSample]:
    return [ThroughputSample(1000.0 + 2 * second, 50 * second, second // 3, 0, 25.0) for second in range(count)]


def test_the_csv_has_a_row_per_pair_with_state_numbers_and_reason(tmp_path: Path) -> None:
    path = write_report_csv(tmp_path / "batch_report.csv", SUMMARY.outcomes)
    rows = list(csv.DictReader(path.open()))
    assert tuple(rows[0]) == REPORT_COLUMNS
    assert [row["state"] for row in rows] == ["succeeded", "skipped", "failed"]
    assert rows[0]["frames"] == "120" and rows[0]["fps"] == "30.00" and rows[0]["seconds"] == "4.000"
    assert rows[1]["detail"].startswith("output exists and is complete")
    assert rows[2]["detail"] == "no face found in the target" and rows[2]["job_id"] == "job-2"


def test_the_json_counts_each_state_and_lists_the_pairs(tmp_path: Path) -> None:
    document = json.loads(write_report_json(tmp_path / "batch_report.json", SUMMARY).read_text())
    assert document["counts"] == {"succeeded": 1, "failed": 1, "cancelled": 0, "skipped": 1}
    assert document["batch_id"] == "batch-id" and document["idempotency_key"] == "batch-key"
    assert [pair["output"] for pair in document["pairs"]] == ["a__x.mp4", "a__y.mp4", "b__x.mov"]
    assert SUMMARY.not_done() == (FAILED,)


def test_the_recent_rate_is_frames_over_the_window_before_each_event() -> None:
    assert recent_fps(samples(5), window_seconds=5.0) == [
        (1002.0, 25.0),
        (1004.0, 25.0),
        (1006.0, 25.0),
        (1008.0, 25.0),
    ]
    # A chunk's frames arriving at once are spread over the window, not shown as a burst.
    burst = [ThroughputSample(1000.0, 0, 0, 0, 0.0), ThroughputSample(1009.0, 0, 0, 0, 0.0)]
    burst.append(ThroughputSample(1010.0, 100, 0, 0, 0.0))
    assert recent_fps(burst, window_seconds=5.0) == [(1009.0, 0.0), (1010.0, 10.0)]
    # An event at the same instant as the first gives no rate rather than a division by zero.
    assert recent_fps([samples(1)[0], samples(1)[0]]) == []


def test_the_throughput_chart_is_a_png_of_its_stated_size_and_deterministic(tmp_path: Path) -> None:
    chart = draw_throughput_chart(tmp_path / "a.png", samples(20), "throughput of batch out")
    image = cv2.imread(str(tmp_path / "a.png"))
    assert image is not None and image.shape[:2] == (CHART_HEIGHT_PIXELS, CHART_WIDTH_PIXELS)
    assert chart.samples == 20 and chart.seconds == 38.0 and chart.peak_recent_fps == 25.0
    draw_throughput_chart(tmp_path / "b.png", samples(20), "throughput of batch out")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_a_chart_without_events_says_so(tmp_path: Path) -> None:
    chart = draw_throughput_chart(tmp_path / "empty.png", [], "throughput of batch out")
    assert chart.title == "throughput of batch out: no progress events seen" and chart.samples == 0
    assert cv2.imread(str(tmp_path / "empty.png")) is not None


def test_the_resume_record_is_read_back_only_for_its_own_key(tmp_path: Path) -> None:
    record = ResumeRecord("batch-key", "batch-id", tuple(samples(3)))
    save_resume(tmp_path, record)
    assert load_resume(tmp_path, "batch-key") == record
    assert load_resume(tmp_path, "another-key") is None
    (tmp_path / RESUME_FILENAME).write_text("{not json")
    assert load_resume(tmp_path, "batch-key") is None


def test_the_resume_log_saves_once_the_batch_is_known_and_then_every_few_seconds(tmp_path: Path) -> None:
    now = [0.0]
    log = ResumeLog(tmp_path, "batch-key", clock=lambda: now[0])
    log.add(samples(1)[0])
    assert not (tmp_path / RESUME_FILENAME).exists()
    log.started("batch-id")
    log.add(samples(2)[1])
    assert load_resume(tmp_path, "batch-key") == ResumeRecord("batch-key", "batch-id", tuple(samples(1)))
    now[0] = 2.0
    log.add(samples(3)[2])
    assert load_resume(tmp_path, "batch-key") == ResumeRecord("batch-key", "batch-id", tuple(samples(3)))

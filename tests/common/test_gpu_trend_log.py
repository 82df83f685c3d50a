from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pytest

from services.common.gpu_trend_log import (
    TREND_HEADER,
    TrendLog,
    delete_expired,
    read_trend_rows,
    trend_file_name,
)
from tests.exporter.telemetry_fixtures import GIB, gpu_sample

# 2024-03-09 23:59:58 UTC
BEFORE_MIDNIGHT = dt.datetime(2024, 3, 9, 23, 59, 58, tzinfo=dt.UTC).timestamp()


def test_header_and_one_row_per_gpu(tmp_path: Path) -> None:
    log = TrendLog(tmp_path, node="gpu-node-1")
    log.append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT), gpu_sample(1, timestamp=BEFORE_MIDNIGHT)])

    lines = (tmp_path / "gpu-trend-2024-03-09.csv").read_text().splitlines()

    assert lines[0] == (
        "timestamp,node,gpu_index,gpu_uuid,gpu_model,utilization_percent,memory_used_bytes,"
        "memory_total_bytes,temperature_celsius,power_watts,decoder_utilization_percent,encoder_utilization_percent"
    )
    assert lines[1].split(",") == [
        "1710028798.000",
        "gpu-node-1",
        "0",
        "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
        "NVIDIA H100 80GB HBM3",
        "87",
        str(20 * GIB),
        str(80 * GIB),
        "61",
        "412.500",
        "7",
        "12",
    ]
    assert lines[2].split(",")[2] == "1"
    assert len(lines) == 3


def test_rows_are_visible_to_a_reader_while_the_writer_keeps_the_file_open(tmp_path: Path) -> None:
    log = TrendLog(tmp_path, node="n")
    log.append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT - 10)])
    first = read_trend_rows(tmp_path, BEFORE_MIDNIGHT - 60, BEFORE_MIDNIGHT)
    log.append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT - 5, utilization_percent=33.5)])
    second = read_trend_rows(tmp_path, BEFORE_MIDNIGHT - 60, BEFORE_MIDNIGHT)

    assert [row.timestamp for row in first] == [BEFORE_MIDNIGHT - 10]
    assert [(row.timestamp, row.utilization_percent) for row in second][-1] == (BEFORE_MIDNIGHT - 5, 33.5)
    assert log.current_path is not None


def test_reader_ignores_a_partial_last_line_and_malformed_rows(tmp_path: Path) -> None:
    log = TrendLog(tmp_path, node="n")
    log.append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT - 3)])
    log.close()
    path = tmp_path / "gpu-trend-2024-03-09.csv"
    with path.open("a") as stream:
        stream.write("garbage,row\n")
        stream.write(f"{BEFORE_MIDNIGHT - 1:.3f},n,0,GPU-x,Model,5")  # still being written

    rows = read_trend_rows(tmp_path, BEFORE_MIDNIGHT - 10, BEFORE_MIDNIGHT)

    assert [row.timestamp for row in rows] == [BEFORE_MIDNIGHT - 3]


def test_reopening_after_a_crash_ends_the_partial_line_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "gpu-trend-2024-03-09.csv"
    path.write_text(TREND_HEADER + "\n" + f"{BEFORE_MIDNIGHT - 9:.3f},n,0,GPU-x,Mo")

    log = TrendLog(tmp_path, node="n")
    log.append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT - 2)])

    rows = read_trend_rows(tmp_path, BEFORE_MIDNIGHT - 10, BEFORE_MIDNIGHT)
    assert [row.timestamp for row in rows] == [BEFORE_MIDNIGHT - 2]
    assert path.read_text().count(TREND_HEADER) == 1


def test_rotation_at_utc_midnight_and_a_window_across_it(tmp_path: Path) -> None:
    log = TrendLog(tmp_path, node="n")
    for offset in range(4):  # 23:59:58, 23:59:59, 00:00:00, 00:00:01
        log.append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT + offset, utilization_percent=float(offset))])

    day_one = (tmp_path / "gpu-trend-2024-03-09.csv").read_text().splitlines()
    day_two = (tmp_path / "gpu-trend-2024-03-10.csv").read_text().splitlines()
    assert (day_one[0], day_two[0]) == (TREND_HEADER, TREND_HEADER)
    assert (len(day_one), len(day_two)) == (3, 3)
    assert log.current_path == tmp_path / "gpu-trend-2024-03-10.csv"

    rows = read_trend_rows(tmp_path, BEFORE_MIDNIGHT + 1, BEFORE_MIDNIGHT + 2)
    assert [row.utilization_percent for row in rows] == [1.0, 2.0]


def test_retention_deletes_days_older_than_the_retention_and_keeps_newer(tmp_path: Path) -> None:
    for day in range(1, 11):
        (tmp_path / trend_file_name(dt.date(2024, 3, day))).write_text(TREND_HEADER + "\n")
    unrelated = tmp_path / "notes.csv"
    unrelated.write_text("keep me")

    deleted = delete_expired(tmp_path, today=dt.date(2024, 3, 10), retention_days=7)

    assert deleted == [trend_file_name(dt.date(2024, 3, day)) for day in (1, 2)]
    remaining = sorted(path.name for path in tmp_path.glob("gpu-trend-*.csv"))
    assert remaining == [trend_file_name(dt.date(2024, 3, day)) for day in range(3, 11)]
    assert unrelated.exists()


def test_rotation_applies_retention(tmp_path: Path) -> None:
    old = tmp_path / trend_file_name(dt.date(2024, 3, 1))
    kept = tmp_path / trend_file_name(dt.date(2024, 3, 8))
    old.write_text(TREND_HEADER + "\n")
    kept.write_text(TREND_HEADER + "\n")

    log = TrendLog(tmp_path, node="n", retention_days=2)
    log.append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT)])

    assert not old.exists()
    assert kept.exists()


def test_read_window_outside_the_log_is_empty(tmp_path: Path) -> None:
    TrendLog(tmp_path, node="n").append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT)])

    assert read_trend_rows(tmp_path, BEFORE_MIDNIGHT + 10, BEFORE_MIDNIGHT + 20) == []
    assert read_trend_rows(tmp_path / "missing", 0, BEFORE_MIDNIGHT) == []


def test_a_window_at_the_end_of_a_long_day_reads_back_only_from_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = TrendLog(tmp_path, node="n")
    day_start = BEFORE_MIDNIGHT - 40_000
    for second in range(0, 40_000, 4):
        log.append([gpu_sample(0, timestamp=day_start + second), gpu_sample(1, timestamp=day_start + second)])
    path = tmp_path / "gpu-trend-2024-03-09.csv"
    read_bytes: list[int] = []
    real_open = Path.open

    def counting_open(self: Path, *args: object, **kwargs: object) -> object:
        handle = real_open(self, *args, **kwargs)  # type: ignore[call-overload]
        original_read = handle.read

        def read(size: int = -1) -> bytes:
            data = original_read(size)
            read_bytes.append(len(data))
            return data

        handle.read = read
        return handle

    monkeypatch.setattr(Path, "open", counting_open)
    recent = read_trend_rows(tmp_path, BEFORE_MIDNIGHT - 10, BEFORE_MIDNIGHT)
    monkeypatch.undo()
    everything = read_trend_rows(tmp_path, day_start, BEFORE_MIDNIGHT)

    assert [row.timestamp for row in recent] == [
        row.timestamp for row in everything if row.timestamp >= BEFORE_MIDNIGHT - 10
    ]
    assert {row.gpu_index for row in recent} == {0, 1} and len(everything) == 20_000
    assert sum(read_bytes) < path.stat().st_size / 10


def test_nvdec_and_nvenc_utilisation_are_read_back_and_a_missing_reading_is_nan(tmp_path: Path) -> None:
    log = TrendLog(tmp_path, node="n")
    log.append(
        [
            gpu_sample(0, timestamp=BEFORE_MIDNIGHT - 2, decoder_utilization_percent=41.5),
            # A GPU without NVENC, such as the H100: NVML gives no encoder reading.
            gpu_sample(1, timestamp=BEFORE_MIDNIGHT - 2, encoder_utilization_percent=None),
        ]
    )

    first, second = read_trend_rows(tmp_path, BEFORE_MIDNIGHT - 10, BEFORE_MIDNIGHT)

    assert (first.decoder_utilization_percent, first.encoder_utilization_percent) == (41.5, 12.0)
    assert second.decoder_utilization_percent == 7.0 and math.isnan(second.encoder_utilization_percent)
    assert (tmp_path / "gpu-trend-2024-03-09.csv").read_text().splitlines()[2].endswith(",7,")


def test_rows_from_before_the_engines_were_logged_still_read_in_the_same_day_file(tmp_path: Path) -> None:
    earlier_header = "timestamp,node,gpu_index,gpu_uuid,gpu_model,utilization_percent,memory_used_bytes,"
    earlier_header += "memory_total_bytes,temperature_celsius,power_watts"
    earlier_row = f"{BEFORE_MIDNIGHT - 5:.3f},n,0,GPU-0,NVIDIA L4,55,1000,24000,50,70.000"
    (tmp_path / "gpu-trend-2024-03-09.csv").write_text(f"{earlier_header}\n{earlier_row}\n")
    TrendLog(tmp_path, node="n").append([gpu_sample(0, timestamp=BEFORE_MIDNIGHT - 1)])

    earlier, current = read_trend_rows(tmp_path, BEFORE_MIDNIGHT - 10, BEFORE_MIDNIGHT)

    assert (earlier.utilization_percent, earlier.power_watts) == (55.0, 70.0)
    assert math.isnan(earlier.decoder_utilization_percent) and math.isnan(earlier.encoder_utilization_percent)
    assert (current.decoder_utilization_percent, current.encoder_utilization_percent) == (7.0, 12.0)

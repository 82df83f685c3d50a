"""The GPU trend log: one CSV per UTC day, one row per GPU per sample, readable while it grows.

Writers only ever append whole lines and flush each one, so a reader tailing the file sees complete
rows plus at most one partial last line, which `read_trend_rows` ignores. Files whose whole day
ended more than `retention_days` ago are deleted.

In services/common because two services share the format: the exporter writes the log, and the
gateway on the same node reads each job's window from it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.common.gpu_telemetry import GpuSample

log = logging.getLogger(__name__)

TREND_COLUMNS = (
    "timestamp",
    "node",
    "gpu_index",
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
# Rows an exporter wrote before NVDEC and NVENC were logged end at power_watts; a day file may hold both.
EARLIER_COLUMN_COUNT = TREND_COLUMNS.index("power_watts") + 1
TREND_HEADER = ",".join(TREND_COLUMNS)
_FILE_NAME = re.compile(r"^gpu-trend-(\d{4}-\d{2}-\d{2})\.csv$")


@dataclass(frozen=True)
class TrendRow:
    """One GPU at one instant. Readings are floats so that other sources of the same rows (the
    gateway's Prometheus reader) can say NaN for a reading they lack; the log itself has them all."""

    timestamp: float
    node: str
    gpu_index: int
    gpu_uuid: str
    gpu_model: str
    utilization_percent: float
    memory_used_bytes: float
    memory_total_bytes: float
    temperature_celsius: float
    power_watts: float
    # NaN where the GPU cannot report the engine, and in rows logged before the engines were.
    decoder_utilization_percent: float = math.nan
    encoder_utilization_percent: float = math.nan


def utc_day(timestamp: float) -> dt.date:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).date()


def trend_file_name(day: dt.date) -> str:
    return f"gpu-trend-{day.isoformat()}.csv"


def trend_file_day(name: str) -> dt.date | None:
    match = _FILE_NAME.match(name)
    if match is None:
        return None
    try:
        return dt.date.fromisoformat(match.group(1))
    except ValueError:
        return None


def delete_expired(trend_dir: Path, today: dt.date, retention_days: int) -> list[str]:
    """Deletes the day files whose day ended more than retention_days before today; returns their names."""
    oldest_kept = today - dt.timedelta(days=retention_days)
    deleted = []
    # Plain os calls, not pathlib: a long-running exporter should not intern a new path string per file.
    for name in sorted(os.listdir(trend_dir)):
        day = trend_file_day(name)
        if day is not None and day < oldest_kept:
            try:
                os.unlink(os.path.join(trend_dir, name))
            except FileNotFoundError:
                continue
            deleted.append(name)
    return deleted


def format_row(node: str, sample: GpuSample) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        (
            f"{sample.timestamp:.3f}",
            node,
            sample.index,
            sample.uuid,
            sample.model,
            f"{sample.utilization_percent:g}",
            sample.memory_used_bytes,
            sample.memory_total_bytes,
            f"{sample.temperature_celsius:g}",
            f"{sample.power_watts:.3f}",
            _optional_cell(sample.decoder_utilization_percent),
            _optional_cell(sample.encoder_utilization_percent),
        )
    )
    return buffer.getvalue()


def _optional_cell(value: float | None) -> str:
    """An empty cell where the GPU gave no reading."""
    return "" if value is None else f"{value:g}"


def _optional_reading(cell: str) -> float:
    return float(cell) if cell else math.nan


class TrendLog:
    """Appends samples to the day file of their timestamp, rotating at UTC midnight."""

    def __init__(self, trend_dir: Path, node: str, retention_days: int = 7) -> None:
        self._dir = trend_dir
        self._node = node
        self._retention_days = retention_days
        self._day: dt.date | None = None
        self._stream: IO[str] | None = None

    @property
    def current_path(self) -> Path | None:
        return self._dir / trend_file_name(self._day) if self._day is not None else None

    def _open_day(self, day: dt.date) -> IO[str]:
        self.close()
        os.makedirs(self._dir, exist_ok=True)
        path = os.path.join(self._dir, trend_file_name(day))
        stream = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115  kept open across appends
        if stream.tell() == 0:
            stream.write(TREND_HEADER + "\n")
        elif not _ends_with_newline(path):
            # A crash left half a row; end it so the next row starts on its own line.
            stream.write("\n")
        stream.flush()
        self._day = day
        self._stream = stream
        delete_expired(self._dir, day, self._retention_days)
        return stream

    def append(self, samples: Iterable[GpuSample]) -> None:
        for sample in samples:
            day = utc_day(sample.timestamp)
            stream = self._stream if day == self._day and self._stream is not None else self._open_day(day)
            stream.write(format_row(self._node, sample))
            stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        self._day = None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as stream:
        stream.seek(-1, io.SEEK_END)
        return stream.read(1) == b"\n"


def _parse_row(fields: list[str]) -> TrendRow | None:
    if len(fields) not in (EARLIER_COLUMN_COUNT, len(TREND_COLUMNS)):
        return None
    engines = fields[EARLIER_COLUMN_COUNT:] or ["", ""]
    try:
        return TrendRow(
            timestamp=float(fields[0]),
            node=fields[1],
            gpu_index=int(fields[2]),
            gpu_uuid=fields[3],
            gpu_model=fields[4],
            utilization_percent=float(fields[5]),
            memory_used_bytes=float(int(fields[6])),
            memory_total_bytes=float(int(fields[7])),
            temperature_celsius=float(fields[8]),
            power_watts=float(fields[9]),
            decoder_utilization_percent=_optional_reading(engines[0]),
            encoder_utilization_percent=_optional_reading(engines[1]),
        )
    except ValueError:
        return None


_TAIL_BLOCK_BYTES = 64 * 1024


def _line_stamp(line: bytes) -> float:
    """The timestamp a row starts with; the header (or a damaged line) sorts before every row."""
    try:
        return float(line.split(b",", 1)[0])
    except ValueError:
        return -math.inf


def _complete_lines(path: Path, since: float = -math.inf) -> list[str]:
    """The file's whole lines from the last one stamped before `since` on.

    Rows are appended in time order, so the file is read backwards a block at a time and reading
    stops once a row older than `since` is in hand: the gateway asks every second for the last few
    seconds of a file that grows all day. A last line without its newline is still being written
    and is left out.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return []
    with handle:
        position = handle.seek(0, os.SEEK_END)
        data = b""
        first = 0
        while position > 0:
            step = min(_TAIL_BLOCK_BYTES, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
            # Above the file's start, the block's first line may be cut: rows begin after a newline.
            first = data.find(b"\n") + 1 if position > 0 else 0
            if position > 0 and first == 0:
                continue
            line_end = data.find(b"\n", first)
            if line_end >= 0 and _line_stamp(data[first:line_end]) < since:
                break
    end = data.rfind(b"\n")
    return data[first : end + 1].decode("utf-8", errors="replace").splitlines() if end >= first else []


def read_trend_rows(trend_dir: Path, start: float, end: float) -> list[TrendRow]:
    """Rows with start <= timestamp <= end from every day file the window touches, in time order."""
    if end < start or not trend_dir.is_dir():
        return []
    first_day, last_day = utc_day(start), utc_day(end)
    rows: list[TrendRow] = []
    for path in sorted(trend_dir.glob("gpu-trend-*.csv")):
        day = trend_file_day(path.name)
        if day is None or not first_day <= day <= last_day:
            continue
        for fields in csv.reader(_complete_lines(path, since=start)):
            row = _parse_row(fields)
            if row is not None and start <= row.timestamp <= end:
                rows.append(row)
    rows.sort(key=lambda row: (row.timestamp, row.gpu_index))
    return rows

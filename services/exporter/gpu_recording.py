"""GPU readings recorded as JSON lines, and replayed through the GpuReader interface where there is no GPU.

Recording format (one JSON object per line, one line per sweep):
    {"samples": [{GpuSample fields}...], "processes": [{GpuProcess fields}...], "xid": [[gpu, xid], ...],
     "driver_version": "550.54"}
or  {"unavailable": "reason"} for a sweep in which NVML could not be read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.gpu_telemetry import GpuProcess, GpuSample, GpuUnavailable


@dataclass(frozen=True)
class RecordedSweep:
    samples: tuple[GpuSample, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    xid: tuple[tuple[int, int], ...] = ()
    unavailable_reason: str | None = None
    driver_version: str = ""


def sweep_to_json(sweep: RecordedSweep) -> str:
    if sweep.unavailable_reason is not None:
        return json.dumps({"unavailable": sweep.unavailable_reason})
    return json.dumps(
        {
            "samples": [dataclasses.asdict(sample) for sample in sweep.samples],
            "processes": [dataclasses.asdict(process) for process in sweep.processes],
            "xid": [list(event) for event in sweep.xid],
            "driver_version": sweep.driver_version,
        }
    )


def sweep_from_json(line: str) -> RecordedSweep:
    record = json.loads(line)
    if "unavailable" in record:
        return RecordedSweep(unavailable_reason=str(record["unavailable"]))
    return RecordedSweep(
        samples=tuple(GpuSample(**fields) for fields in record.get("samples", [])),
        processes=tuple(GpuProcess(**fields) for fields in record.get("processes", [])),
        xid=tuple((int(gpu), int(xid)) for gpu, xid in record.get("xid", [])),
        driver_version=str(record.get("driver_version", "")),
    )


def write_recording(path: Path, sweeps: Iterable[RecordedSweep]) -> Path:
    with path.open("w", encoding="utf-8") as stream:
        for sweep in sweeps:
            stream.write(sweep_to_json(sweep) + "\n")
    return path


class RecordedReader:
    """Replays a recording, one sweep per `sample_all()` call.

    `processes()` and `xid_events()` answer for the sweep the last `sample_all()` moved to. With
    `cycle` the recording starts over at its end; without, every call after the end raises
    GpuUnavailable("recording ended"). With `clock`, sample timestamps are replaced by its time,
    so a replay looks live.
    """

    def __init__(self, path: Path, *, cycle: bool = True, clock: Callable[[], float] | None = None) -> None:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        self._sweeps = [sweep_from_json(line) for line in lines]
        self._cycle = cycle
        self._clock = clock
        self._position = -1
        self._current: RecordedSweep | None = None
        versions = [sweep.driver_version for sweep in self._sweeps if sweep.driver_version]
        self._driver_version = versions[0] if versions else ""

    def _advance(self) -> RecordedSweep:
        self._position += 1
        if self._position >= len(self._sweeps):
            if not self._cycle or not self._sweeps:
                self._current = None
                raise GpuUnavailable("recording ended")
            self._position = 0
        self._current = self._sweeps[self._position]
        return self._current

    def sample_all(self) -> list[GpuSample]:
        sweep = self._advance()
        if sweep.unavailable_reason is not None:
            raise GpuUnavailable(sweep.unavailable_reason)
        if self._clock is None:
            return list(sweep.samples)
        now = self._clock()
        return [dataclasses.replace(sample, timestamp=now) for sample in sweep.samples]

    def processes(self) -> list[GpuProcess]:
        if self._current is None:
            raise GpuUnavailable("recording ended")
        if self._current.unavailable_reason is not None:
            raise GpuUnavailable(self._current.unavailable_reason)
        return list(self._current.processes)

    def xid_events(self) -> list[tuple[int, int]]:
        if self._current is None or self._current.unavailable_reason is not None:
            return []
        return list(self._current.xid)

    def driver_version(self) -> str:
        return self._driver_version

    def close(self) -> None:
        self._current = None

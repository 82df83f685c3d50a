"""What the GPU benchmark watches while a job runs: the GPU through NVML, and the machine's CPU cores.

NvmlSampler reads every GPU's utilisation, memory, NVDEC and NVENC utilisation on a thread at a fixed
interval; a window's summary is the mean and max of the samples taken inside it. CoreCounter turns two
readings of /proc/stat into the number of cores kept busy between them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# /proc/stat's first line: user nice system idle iowait irq softirq steal ...
_IDLE_FIELDS = (3, 4)


@dataclass(frozen=True)
class GpuSample:
    at: float
    gpu: int
    utilisation: float  # percent of the interval a kernel ran
    memory_used_bytes: int
    decoder_utilisation: float | None  # None where NVML cannot read it
    encoder_utilisation: float | None


@dataclass(frozen=True)
class GpuWindow:
    samples: int
    utilisation_mean: float
    utilisation_max: float
    memory_used_max_bytes: int
    decoder_utilisation_mean: float | None
    decoder_utilisation_max: float | None
    encoder_utilisation_mean: float | None
    encoder_utilisation_max: float | None


def _mean_max(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [value for value in values if value is not None]
    if not known:
        return None, None
    return sum(known) / len(known), max(known)


def summarise_window(samples: Sequence[GpuSample], start: float, end: float) -> GpuWindow | None:
    """Mean and max over the samples taken in [start, end], all GPUs together; None without samples."""
    inside = [sample for sample in samples if start <= sample.at <= end]
    if not inside:
        return None
    utilisation = [sample.utilisation for sample in inside]
    decoder_mean, decoder_max = _mean_max([sample.decoder_utilisation for sample in inside])
    encoder_mean, encoder_max = _mean_max([sample.encoder_utilisation for sample in inside])
    return GpuWindow(
        samples=len(inside),
        utilisation_mean=sum(utilisation) / len(utilisation),
        utilisation_max=max(utilisation),
        memory_used_max_bytes=max(sample.memory_used_bytes for sample in inside),
        decoder_utilisation_mean=decoder_mean,
        decoder_utilisation_max=decoder_max,
        encoder_utilisation_mean=encoder_mean,
        encoder_utilisation_max=encoder_max,
    )


def summarise_gpus(samples: Sequence[GpuSample], start: float, end: float) -> dict[int, GpuWindow]:
    """summarise_window for each GPU (NVML's index) apart: whether every GPU of the machine worked."""
    return {
        gpu: window
        for gpu in sorted({sample.gpu for sample in samples})
        if (window := summarise_window([sample for sample in samples if sample.gpu == gpu], start, end)) is not None
    }


def _optional_read(read: Callable[[], float]) -> float | None:
    try:
        return float(read())
    except Exception:  # NVML raises its own error classes for "not supported" and friends
        return None


class NvmlSampler:
    """Samples every GPU every `interval` seconds on a daemon thread, between start() and stop()."""

    def __init__(self, interval: float = 0.1) -> None:
        import pynvml

        self._nvml = pynvml
        self._interval = interval
        self.samples: list[GpuSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(pynvml.nvmlDeviceGetCount())]
        self.names = [str(pynvml.nvmlDeviceGetName(handle)) for handle in self._handles]

    def start(self) -> NvmlSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()

    def _read(self, index: int, handle: object) -> GpuSample:
        nvml = self._nvml
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        return GpuSample(
            at=time.monotonic(),
            gpu=index,
            utilisation=float(rates.gpu),
            memory_used_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).used),
            decoder_utilisation=_optional_read(lambda: nvml.nvmlDeviceGetDecoderUtilization(handle)[0]),
            encoder_utilisation=_optional_read(lambda: nvml.nvmlDeviceGetEncoderUtilization(handle)[0]),
        )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.extend(self._read(index, handle) for index, handle in enumerate(self._handles))


@dataclass(frozen=True)
class CpuReading:
    busy_ticks: int
    total_ticks: int


def parse_proc_stat(text: str) -> CpuReading:
    """The aggregate `cpu` line of /proc/stat as busy and total ticks (idle and iowait are not busy)."""
    fields = [int(value) for value in text.splitlines()[0].split()[1:]]
    total = sum(fields[:8])
    idle = sum(fields[index] for index in _IDLE_FIELDS)
    return CpuReading(busy_ticks=total - idle, total_ticks=total)


def cores_busy(before: CpuReading, after: CpuReading, cores: int) -> float:
    """Cores kept busy on average between two readings."""
    elapsed = after.total_ticks - before.total_ticks
    if elapsed <= 0:
        return 0.0
    return cores * (after.busy_ticks - before.busy_ticks) / elapsed


@dataclass
class CoreCounter:
    """Cores busy over a window of the whole machine (every process, ours and not)."""

    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    _before: CpuReading | None = None

    def begin(self) -> None:
        self._before = parse_proc_stat(PROC_STAT.read_text())

    def end(self) -> float:
        if self._before is None:
            raise RuntimeError("CoreCounter.end() before begin()")
        return cores_busy(self._before, parse_proc_stat(PROC_STAT.read_text()), self.cores)


def _process_table(proc: Path = Path("/proc")) -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, what it runs, CPU seconds used so far), for every process readable here."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The command name in parentheses may hold spaces; the fields after it are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        parent, user, system = int(fields[1]), int(fields[11]), int(fields[12])
        table[int(entry.name)] = (parent, process_role(command), (user + system) / ticks)
    return table


def process_role(command: Sequence[bytes]) -> str:
    """A short name for what a process runs: the service of `python -m services.<name>`, else its program."""
    words = [word.decode(errors="replace") for word in command if word]
    if "-m" in words[:-1]:
        module = words[words.index("-m") + 1]
        return module.removeprefix("services.")
    return Path(words[0]).name if words else "?"


def descendant_cpu_seconds(root: int | None = None) -> dict[str, float]:
    """CPU seconds used so far by every process below `root` (default: this one), summed by role."""
    table = _process_table()
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    totals: dict[str, float] = {}
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop()
        _, role, seconds = table[pid]
        totals[role] = totals.get(role, 0.0) + seconds
        pending.extend(children.get(pid, []))
    return totals


def cpu_ms_per_frame(before: dict[str, float], after: dict[str, float], frames: int) -> dict[str, float]:
    """Each role's CPU milliseconds per frame between two descendant_cpu_seconds readings."""
    return {
        role: 1000 * (seconds - before.get(role, 0.0)) / max(frames, 1)
        for role, seconds in sorted(after.items())
        if seconds > before.get(role, 0.0)
    }

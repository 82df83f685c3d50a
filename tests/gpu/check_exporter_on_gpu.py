"""Runs the exporter beside a real GPU load on the GPU machine and checks what it reports.

Run from the repository root:  python -m tests.gpu.check_exporter_on_gpu
(not a pytest module: `make test` runs off-GPU). Needs torch with CUDA, nvidia-ml-py and
prometheus-client; matplotlib is optional (the chart is skipped without it), kubernetes is not used.

Phases, all while one subprocess keeps the GPU busy with fp16 matmuls and holds a few GiB:
  1. scrape /metrics every second for SCRAPE_SECONDS and check utilisation, memory, temperature,
     power and the load's per-process memory;
  2. leave the exporter alone for CPU_SECONDS at 1 Hz and measure its CPU time over wall time;
  3. time SWEEPS full NVML sweeps (every read, every GPU) with a second reader;
then check the trend CSV, draw the trend chart and print (and write to $OUT) a JSON summary.
Exits 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.common.gpu_telemetry import NvmlReader
from services.common.gpu_trend_log import TrendRow, read_trend_rows
from services.exporter.exporter_runtime import RunningExporter
from services.exporter.settings import ExporterSettings

SCRAPE_SECONDS = 15
CPU_SECONDS = 20
SWEEPS = 100
LOAD_GIB = 4.0
LOAD_SECONDS = SCRAPE_SECONDS + CPU_SECONDS + 10
UTILIZATION_THRESHOLD = 50.0
SWEEP_TARGET_MS_PER_GPU = 5.0
CPU_TARGET_PERCENT = 1.0
GIB = 1024**3

LOAD_PROGRAM = """
import sys, time, torch
seconds, gib = float(sys.argv[1]), float(sys.argv[2])
ballast = torch.empty(int(gib * 1024**3), dtype=torch.uint8, device="cuda")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
b = torch.randn_like(a)
torch.cuda.synchronize()
print("ready", torch.cuda.memory_reserved(), flush=True)
end = time.monotonic() + seconds
count = 0
while time.monotonic() < end:
    for _ in range(8):
        c = a @ b
    torch.cuda.synchronize()
    count += 8
print("done", count, flush=True)
"""


@dataclass
class Scrape:
    at: float
    series: dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Checks:
    results: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, note: str = "") -> None:
        self.results[name] = bool(passed)
        if note:
            self.notes.append(f"{name}: {note}")


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    series = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Scrape(time.time(), series)


def values(scrapes: list[Scrape], name: str, **labels: str) -> list[float]:
    found = []
    for one in scrapes:
        for (metric, metric_labels), value in one.series.items():
            as_dict = dict(metric_labels)
            if metric == name and all(as_dict.get(key) == wanted for key, wanted in labels.items()):
                found.append(value)
    return found


def percentile(data: list[float], fraction: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def time_call(call: Callable[[], Any], repeats: int = 20) -> float:
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            call()
        except Exception:
            return -1.0
        durations.append(time.perf_counter() - started)
    return statistics.median(durations) * 1000.0


def nvml_call_costs() -> dict[str, float]:
    """Median ms of each NVML read on GPU 0 (-1 where unsupported), to explain a slow sweep."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        calls: dict[str, Callable[[], Any]] = {
            "utilization": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle),
            "memory_v2": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2),
            "temperature": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power": lambda: pynvml.nvmlDeviceGetPowerUsage(handle),
            "power_limit": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle),
            "sm_clock": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "clock_event_reasons": lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
            "encoder": lambda: pynvml.nvmlDeviceGetEncoderUtilization(handle),
            "ecc_uncorrected": lambda: pynvml.nvmlDeviceGetTotalEccErrors(
                handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
            ),
            "pcie_byte_counters": lambda: pynvml.nvmlDeviceGetFieldValues(
                handle, [pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES]
            ),
            "pcie_throughput_tx": lambda: pynvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_TX_BYTES),
            "compute_processes": lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(handle),
        }
        costs = {
            name: round(time_call(call, repeats=5 if name.startswith("pcie_throughput") else 20), 3)
            for name, call in calls.items()
        }
        fields = pynvml.nvmlDeviceGetFieldValues(
            handle, [pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES]
        )
        costs["pcie_byte_counters_supported"] = float(all(value.nvmlReturn == 0 for value in fields))
        return costs
    finally:
        pynvml.nvmlShutdown()


def measure_sweeps(count: int) -> dict[str, float]:
    reader = NvmlReader()
    try:
        for _ in range(3):
            reader.sample_all()
            reader.processes()
        gpu_count = len(reader.sample_all())
        per_gpu_ms = []
        for _ in range(count):
            started = time.perf_counter()
            reader.sample_all()
            reader.processes()
            reader.xid_events()
            per_gpu_ms.append((time.perf_counter() - started) * 1000.0 / gpu_count)
    finally:
        reader.close()
    return {
        "gpus": gpu_count,
        "median_ms_per_gpu": round(statistics.median(per_gpu_ms), 3),
        "p95_ms_per_gpu": round(percentile(per_gpu_ms, 0.95), 3),
        "max_ms_per_gpu": round(max(per_gpu_ms), 3),
    }


def draw_chart(rows: list[TrendRow], load_window: tuple[float, float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    origin = rows[0].timestamp if rows else load_window[0]
    panels = [
        ("GPU utilisation (%)", lambda row: row.utilization_percent),
        ("memory used (GiB)", lambda row: row.memory_used_bytes / GIB),
        ("temperature (C)", lambda row: row.temperature_celsius),
        ("power (W)", lambda row: row.power_watts),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 9), sharex=True)
    for axis, (title, value) in zip(axes, panels, strict=True):
        for gpu in sorted({row.gpu_index for row in rows}):
            mine = [row for row in rows if row.gpu_index == gpu]
            axis.plot([row.timestamp - origin for row in mine], [value(row) for row in mine], label=f"GPU {gpu}")
        axis.axvspan(load_window[0] - origin, load_window[1] - origin, color="tab:orange", alpha=0.15)
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    axes[0].set_title("swapline exporter trend log beside a torch matmul load (shaded)")
    axes[-1].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def main() -> int:
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="exporter-gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="exporter-trend-"))
    settings = ExporterSettings(
        host="127.0.0.1",
        port=0,
        trend_dir=work / "trend",
        node_name="gpu-check",
        kubernetes_attribution=False,
    )
    checks = Checks()
    summary: dict[str, Any] = {"python": sys.version.split()[0]}
    exporter = RunningExporter(settings, NvmlReader()).start()
    base = f"http://127.0.0.1:{exporter.server.port}"
    load: subprocess.Popen[str] | None = None
    try:
        first = scrape(f"{base}/metrics")
        checks.check("nvml_up", values([first], "swapline_gpu_nvml_up") == [1.0], str(exporter.sampler.snapshot.reason))
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            checks.check("healthz", response.status == 200)
        summary["driver_version"] = exporter.sampler.snapshot.driver_version
        summary["gpus"] = [sample.model for sample in exporter.sampler.snapshot.samples]

        load = subprocess.Popen(
            [sys.executable, "-c", LOAD_PROGRAM, str(LOAD_SECONDS), str(LOAD_GIB)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        )
        assert load.stdout is not None
        ready = load.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"the GPU load did not start: {ready}")
        load_reserved = int(ready[1])
        load_started = time.time()
        summary["load"] = {"pid": load.pid, "torch_reserved_bytes": load_reserved, "seconds": LOAD_SECONDS}

        scrapes = []
        tick = time.monotonic()
        for _ in range(SCRAPE_SECONDS):
            scrapes.append(scrape(f"{base}/metrics"))
            tick += 1.0
            time.sleep(max(0.0, tick - time.monotonic()))
        check_scrapes(checks, summary, scrapes, load.pid, load_reserved)

        cpu_started, wall_started = time.process_time(), time.monotonic()
        time.sleep(CPU_SECONDS)
        cpu_percent = (time.process_time() - cpu_started) / (time.monotonic() - wall_started) * 100.0
        summary["exporter_cpu_percent_of_one_core_at_1hz"] = round(cpu_percent, 3)
        checks.check("cpu_target", cpu_percent <= CPU_TARGET_PERCENT, f"{cpu_percent:.3f}% of one core")

        sweep = measure_sweeps(SWEEPS)
        summary["nvml_sweep"] = sweep
        checks.check(
            "sweep_target",
            sweep["median_ms_per_gpu"] <= SWEEP_TARGET_MS_PER_GPU,
            f"{sweep['median_ms_per_gpu']} ms",
        )
        summary["nvml_call_ms_gpu0"] = nvml_call_costs()
        load_ended = time.time()
    finally:
        if load is not None:
            load.terminate()
            load.wait(timeout=30)
        exporter.stop()

    rows = read_trend_rows(settings.trend_dir, load_started - 60, load_ended + 60)
    checks.check("trend_rows", len(rows) >= SCRAPE_SECONDS, f"{len(rows)} rows")
    checks.check("trend_utilization", any(row.utilization_percent > UTILIZATION_THRESHOLD for row in rows))
    for path in settings.trend_dir.glob("gpu-trend-*.csv"):
        shutil.copy(path, out_dir / path.name)
    chart = out_dir / "exporter_gpu_trend.png"
    summary["chart"] = str(chart) if draw_chart(rows, (load_started, load_ended), chart) else "matplotlib missing"
    checks.check("chart_written", chart.exists() or summary["chart"] == "matplotlib missing")

    summary["checks"] = checks.results
    summary["notes"] = checks.notes
    summary["passed"] = all(checks.results.values())
    text = json.dumps(summary, indent=2)
    print(text)
    (out_dir / "exporter_gpu_check.json").write_text(text + "\n")
    return 0 if summary["passed"] else 1


def check_scrapes(
    checks: Checks, summary: dict[str, Any], scrapes: list[Scrape], load_pid: int, load_reserved: int
) -> None:
    process_memory = values(scrapes, "swapline_gpu_process_memory_used_bytes", pid=str(load_pid))
    load_gpu = "0"
    for one in scrapes:
        for (name, labels), _ in one.series.items():
            if name == "swapline_gpu_process_memory_used_bytes" and dict(labels).get("pid") == str(load_pid):
                load_gpu = dict(labels)["gpu"]
    utilization = values(scrapes, "swapline_gpu_utilization_percent", gpu=load_gpu)
    busy = [value for value in utilization if value > UTILIZATION_THRESHOLD]
    memory_used = values(scrapes, "swapline_gpu_memory_used_bytes", gpu=load_gpu)
    memory_total = values(scrapes, "swapline_gpu_memory_total_bytes", gpu=load_gpu)
    temperature = values(scrapes, "swapline_gpu_temperature_celsius", gpu=load_gpu)
    power = values(scrapes, "swapline_gpu_power_watts", gpu=load_gpu)
    power_limit = values(scrapes, "swapline_gpu_power_limit_watts", gpu=load_gpu)
    summary["during_load"] = {
        "gpu": load_gpu,
        "utilization_percent": utilization,
        "memory_used_gib_max": round(max(memory_used, default=0) / GIB, 2),
        "temperature_celsius_max": max(temperature, default=0),
        "power_watts_max": max(power, default=0),
        "power_limit_watts": max(power_limit, default=0),
        "load_process_memory_gib_max": round(max(process_memory, default=0) / GIB, 2),
        "process_pids_seen": sorted(
            {
                dict(labels)["pid"]
                for one in scrapes
                for (name, labels) in one.series
                if name == "swapline_gpu_process_memory_used_bytes"
            }
        ),
    }
    checks.check(
        "utilization_above_50",
        len(busy) >= len(utilization) // 2 and len(busy) > 0,
        f"{len(busy)} of {len(utilization)} scrapes above {UTILIZATION_THRESHOLD}%",
    )
    # The first scrapes can precede the load's allocation (the sweep runs up to a second behind):
    # memory is judged on the scrapes that saw the load computing.
    busy_memory = [
        used for used, busy_now in zip(memory_used, utilization, strict=False) if busy_now > UTILIZATION_THRESHOLD
    ]
    checks.check(
        "memory_plausible",
        bool(busy_memory)
        and min(busy_memory) >= LOAD_GIB * GIB
        and all(used <= total for used, total in zip(memory_used, memory_total, strict=False)),
        f"{len(busy_memory)} busy scrapes, least {min(busy_memory, default=0) / GIB:.2f} GiB used",
    )
    checks.check("temperature_plausible", bool(temperature) and all(10.0 <= value <= 110.0 for value in temperature))
    checks.check(
        "power_plausible",
        bool(power) and all(0.0 < value <= 1.2 * limit for value, limit in zip(power, power_limit, strict=False)),
    )
    expected_bytes = 0.9 * min(load_reserved, LOAD_GIB * GIB)
    if process_memory:
        checks.check(
            "load_process_memory",
            max(process_memory) >= expected_bytes,
            f"pid {load_pid}: {max(process_memory) / GIB:.2f} GiB",
        )
        return
    # NVML names PIDs as the host sees them; inside a container with its own PID namespace the load's
    # PID differs, so the load is recognised by its memory instead, and the note says so.
    by_size = {
        dict(labels)["pid"]
        for one in scrapes
        for (name, labels), value in one.series.items()
        if name == "swapline_gpu_process_memory_used_bytes" and value >= expected_bytes
    }
    checks.check(
        "load_process_memory",
        len(by_size) == 1,
        f"pid {load_pid} not in NVML's list (another PID namespace); matched by size: {sorted(by_size)}",
    )


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus rendering of the latest sweep, built fresh at scrape time.

A custom collector instead of long-lived Gauge objects: every scrape renders only what the last
sweep saw, so the series of a GPU or process that went away vanish and no label set accumulates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from services.common.gpu_telemetry import GpuSample
from services.exporter.gpu_sampler import SWEEP_SECONDS_BUCKETS, SweepSnapshot

ClockEventReason = Literal[
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
]
CLOCK_EVENT_REASONS: tuple[ClockEventReason, ...] = get_args(ClockEventReason)
# NVML's nvmlClocksEventReason* bits, in the order of CLOCK_EVENT_REASONS.
CLOCK_EVENT_BITS: dict[ClockEventReason, int] = {
    reason: 1 << position for position, reason in enumerate(CLOCK_EVENT_REASONS)
}

GPU_LABELS = ("gpu", "uuid", "model", "node")
POD_LABELS = ("namespace", "pod", "container")
PROCESS_LABELS = ("gpu", "uuid", "node", "pid", "pod", "namespace", "container")

# (metric name, help, GpuSample field) for every plain per-GPU gauge.
GPU_GAUGES: tuple[tuple[str, str, str], ...] = (
    (
        "swapline_gpu_utilization_percent",
        "GPU (SM) utilisation over the last sample period.",
        "utilization_percent",
    ),
    (
        "swapline_gpu_memory_utilization_percent",
        "Share of time the memory controller was busy.",
        "memory_utilization_percent",
    ),
    ("swapline_gpu_memory_used_bytes", "Frame buffer memory in use.", "memory_used_bytes"),
    ("swapline_gpu_memory_total_bytes", "Frame buffer memory in total.", "memory_total_bytes"),
    (
        "swapline_gpu_memory_reserved_bytes",
        "Frame buffer memory reserved by the driver.",
        "memory_reserved_bytes",
    ),
    ("swapline_gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius"),
    ("swapline_gpu_power_watts", "Power draw.", "power_watts"),
    ("swapline_gpu_power_limit_watts", "Enforced power limit.", "power_limit_watts"),
    ("swapline_gpu_sm_clock_mhz", "SM clock.", "sm_clock_mhz"),
    ("swapline_gpu_memory_clock_mhz", "Memory clock.", "memory_clock_mhz"),
    (
        "swapline_gpu_encoder_utilization_percent",
        "NVENC utilisation over NVML's sampling period; absent where the GPU cannot report it.",
        "encoder_utilization_percent",
    ),
    (
        "swapline_gpu_decoder_utilization_percent",
        "NVDEC utilisation over NVML's sampling period; absent where the GPU cannot report it.",
        "decoder_utilization_percent",
    ),
    (
        "swapline_gpu_pcie_tx_bytes_per_second",
        "PCIe bytes sent by the GPU per second.",
        "pcie_tx_bytes_per_second",
    ),
    (
        "swapline_gpu_pcie_rx_bytes_per_second",
        "PCIe bytes received by the GPU per second.",
        "pcie_rx_bytes_per_second",
    ),
)


def gpu_label_values(sample: GpuSample, node: str) -> list[str]:
    return [str(sample.index), sample.uuid, sample.model, node]


class GpuMetricsCollector(Collector):
    def __init__(self, snapshot: Callable[[], SweepSnapshot], node: str) -> None:
        self._snapshot = snapshot
        self._node = node

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        yield from self._health(snapshot)
        yield from self._gpus(snapshot)
        yield from self._allocations(snapshot)
        yield from self._processes(snapshot)
        yield from self._xids(snapshot)
        yield from self._exporter(snapshot)

    def _health(self, snapshot: SweepSnapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "swapline_gpu_nvml_up",
            "1 when the last sweep read NVML, else 0 with the reason.",
            labels=["reason"],
        )
        up.add_metric([snapshot.reason], 1.0 if snapshot.nvml_up else 0.0)
        yield up

    def _gpus(self, snapshot: SweepSnapshot) -> Iterator[Metric]:
        node = self._node
        info = GaugeMetricFamily("swapline_gpu_info", "GPU identity; always 1.", labels=[*GPU_LABELS, "driver_version"])
        gauges = [GaugeMetricFamily(name, text, labels=GPU_LABELS) for name, text, _ in GPU_GAUGES]
        clock_events = GaugeMetricFamily(
            "swapline_gpu_clock_event_active",
            "1 while NVML reports this clock event (throttle) reason.",
            labels=[*GPU_LABELS, "reason"],
        )
        ecc = CounterMetricFamily(
            "swapline_gpu_ecc_uncorrected_errors_total",
            "Uncorrected ECC errors since the driver loaded (volatile count).",
            labels=GPU_LABELS,
        )
        for sample in snapshot.samples:
            labels = gpu_label_values(sample, node)
            info.add_metric([*labels, snapshot.driver_version], 1.0)
            for gauge, (_, _, attribute) in zip(gauges, GPU_GAUGES, strict=True):
                # A reading the GPU cannot give (None) is left out, not exported as a false 0.
                value = getattr(sample, attribute)
                if value is not None:
                    gauge.add_metric(labels, float(value))
            for reason in CLOCK_EVENT_REASONS:
                active = sample.clock_event_reasons & CLOCK_EVENT_BITS[reason]
                clock_events.add_metric([*labels, reason], 1.0 if active else 0.0)
            if sample.ecc_uncorrected_errors is not None:
                ecc.add_metric(labels, float(sample.ecc_uncorrected_errors))
        yield info
        yield from gauges
        yield clock_events
        yield ecc

    def _allocations(self, snapshot: SweepSnapshot) -> Iterator[Metric]:
        """One series per container holding a GPU, to join the per-GPU series with by uuid and node.

        An info series rather than pod labels on every GPU series: under time-slicing several containers
        hold one GPU, and a GPU's utilisation repeated once per holder would add up to more than the GPU.
        """
        holding = GaugeMetricFamily(
            "swapline_gpu_pod_info",
            "A pod container the kubelet allocated this GPU to (pod-resources API); always 1.",
            labels=[*GPU_LABELS, *POD_LABELS],
        )
        by_index = {sample.index: sample for sample in snapshot.samples}
        for allocation in snapshot.allocations:
            pod = allocation.pod
            labels = gpu_label_values(by_index[allocation.gpu_index], self._node)
            holding.add_metric([*labels, pod.namespace, pod.pod, pod.container], 1.0)
        yield holding

    def _processes(self, snapshot: SweepSnapshot) -> Iterator[Metric]:
        memory = GaugeMetricFamily(
            "swapline_gpu_process_memory_used_bytes", "GPU memory used by one process.", labels=PROCESS_LABELS
        )
        sm = GaugeMetricFamily(
            "swapline_gpu_process_sm_utilization_percent",
            "SM utilisation of one process, where the GPU reports it.",
            labels=PROCESS_LABELS,
        )
        for usage in snapshot.processes:
            labels = [
                str(usage.process.gpu_index),
                usage.gpu_uuid,
                self._node,
                str(usage.process.pid),
                usage.pod.pod,
                usage.pod.namespace,
                usage.pod.container,
            ]
            memory.add_metric(labels, float(usage.process.used_memory_bytes))
            if usage.process.sm_utilization_percent is not None:
                sm.add_metric(labels, usage.process.sm_utilization_percent)
        yield memory
        yield sm

    def _xids(self, snapshot: SweepSnapshot) -> Iterator[Metric]:
        xid = CounterMetricFamily(
            "swapline_gpu_xid_errors_total",
            "XID critical errors seen since the exporter started.",
            labels=[*GPU_LABELS, "xid"],
        )
        by_index = {sample.index: sample for sample in snapshot.samples}
        for (gpu_index, code), count in snapshot.xid_counts:
            sample = by_index.get(gpu_index)
            labels = gpu_label_values(sample, self._node) if sample else [str(gpu_index), "", "", self._node]
            xid.add_metric([*labels, str(code)], float(count))
        yield xid

    def _exporter(self, snapshot: SweepSnapshot) -> Iterator[Metric]:
        histogram = snapshot.sweep_seconds
        yield HistogramMetricFamily(
            "swapline_exporter_sweep_seconds",
            "Duration of one sweep of every NVML read over every GPU.",
            buckets=[
                *(
                    (f"{bound:g}", float(count))
                    for bound, count in zip(SWEEP_SECONDS_BUCKETS, histogram.bucket_counts, strict=True)
                ),
                ("+Inf", float(histogram.count)),
            ],
            sum_value=histogram.total_seconds,
        )
        sweeps = CounterMetricFamily("swapline_exporter_sweeps_total", "Sweeps tried, failed ones included.")
        sweeps.add_metric([], float(snapshot.sweeps_total))
        yield sweeps
        errors = CounterMetricFamily("swapline_exporter_nvml_errors_total", "Sweeps in which NVML could not be read.")
        errors.add_metric([], float(snapshot.nvml_errors_total))
        yield errors


def exporter_registry(snapshot: Callable[[], SweepSnapshot], node: str) -> CollectorRegistry:
    """A registry of its own: the GPU collector plus the process's CPU and memory (process_*)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuMetricsCollector(snapshot, node))
    ProcessCollector(registry=registry)
    return registry

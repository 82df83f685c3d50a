from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.exporter.gpu_metrics import exporter_registry
from services.exporter.gpu_recording import RecordedReader, RecordedSweep
from services.exporter.gpu_sampler import GpuSampler
from services.exporter.pod_attribution import GpuHolders, PodAttributor, PodRef
from tests.exporter.telemetry_fixtures import GIB, FakeClock, gpu_process, gpu_sample, outage, record, sweep

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NODE = "gpu-node-7"


def scrape_text(sampler: GpuSampler) -> str:
    return generate_latest(exporter_registry(lambda: sampler.snapshot, NODE)).decode()


def scrape(sampler: GpuSampler) -> Series:
    series: Series = {}
    for family in text_string_to_metric_families(scrape_text(sampler)):
        for sample in family.samples:
            series[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return series


def gpu_labels(index: int, **extra: str) -> tuple[tuple[str, str], ...]:
    sample = gpu_sample(index)
    labels = {"gpu": str(index), "uuid": sample.uuid, "model": sample.model, "node": NODE, **extra}
    return tuple(sorted(labels.items()))


def names_with(series: Series, gpu: str) -> set[str]:
    return {name for name, labels in series if ("gpu", gpu) in labels}


def sampler_over(tmp_path: Path, sweeps: list[RecordedSweep], attributor: PodAttributor | None = None) -> GpuSampler:
    path = record(tmp_path / "rec.jsonl", sweeps)
    return GpuSampler(RecordedReader(path, cycle=False), node=NODE, attributor=attributor, clock=FakeClock())


def test_every_per_gpu_metric_carries_its_value_and_labels(tmp_path: Path) -> None:
    sampler = sampler_over(
        tmp_path,
        [sweep([gpu_sample(0, clock_event_reasons=0x4 | 0x40), gpu_sample(1)], driver_version="550.1")],
    )
    sampler.sweep()

    series = scrape(sampler)

    labels = gpu_labels(0)
    expected = {
        "swapline_gpu_utilization_percent": 87.0,
        "swapline_gpu_memory_utilization_percent": 41.0,
        "swapline_gpu_memory_used_bytes": 20 * GIB,
        "swapline_gpu_memory_total_bytes": 80 * GIB,
        "swapline_gpu_memory_reserved_bytes": 512 * 1024**2,
        "swapline_gpu_temperature_celsius": 61.0,
        "swapline_gpu_power_watts": 412.5,
        "swapline_gpu_power_limit_watts": 700.0,
        "swapline_gpu_sm_clock_mhz": 1980,
        "swapline_gpu_memory_clock_mhz": 2619,
        "swapline_gpu_encoder_utilization_percent": 12.0,
        "swapline_gpu_decoder_utilization_percent": 7.0,
        "swapline_gpu_pcie_tx_bytes_per_second": 3.5e9,
        "swapline_gpu_pcie_rx_bytes_per_second": 1.25e9,
        "swapline_gpu_ecc_uncorrected_errors_total": 0.0,
    }
    assert {name: series[(name, labels)] for name in expected} == expected
    assert series[("swapline_gpu_utilization_percent", gpu_labels(1))] == 88.0
    assert series[("swapline_gpu_info", gpu_labels(0, driver_version="550.1"))] == 1.0
    assert series[("swapline_gpu_nvml_up", (("reason", ""),))] == 1.0
    active = {
        dict(key[1])["reason"]
        for key, value in series.items()
        if key[0] == "swapline_gpu_clock_event_active" and ("gpu", "0") in key[1] and value == 1.0
    }
    assert active == {"sw_power_cap", "hw_thermal_slowdown"}
    reasons = [key for key in series if key[0] == "swapline_gpu_clock_event_active" and ("gpu", "0") in key[1]]
    assert len(reasons) == 9


def test_a_gpu_that_disappears_drops_all_its_series(tmp_path: Path) -> None:
    sampler = sampler_over(tmp_path, [sweep([gpu_sample(0), gpu_sample(1)]), sweep([gpu_sample(0)])])
    sampler.sweep()
    before = scrape(sampler)
    sampler.sweep()
    after = scrape(sampler)

    assert "swapline_gpu_power_watts" in names_with(before, "1")
    assert names_with(after, "1") == set()
    assert names_with(after, "0") == names_with(before, "0")


def test_ecc_is_absent_where_unsupported(tmp_path: Path) -> None:
    sampler = sampler_over(tmp_path, [sweep([gpu_sample(0, ecc_uncorrected_errors=None), gpu_sample(1)])])
    sampler.sweep()

    ecc = [labels for name, labels in scrape(sampler) if name == "swapline_gpu_ecc_uncorrected_errors_total"]

    assert ecc == [gpu_labels(1)]


def test_nvdec_and_nvenc_series_are_absent_for_a_gpu_that_cannot_report_them(tmp_path: Path) -> None:
    # GPU 0 as an H100 reports NVDEC but has no NVENC; GPU 1 reports neither.
    sampler = sampler_over(
        tmp_path,
        [
            sweep(
                [
                    gpu_sample(0, decoder_utilization_percent=63.0, encoder_utilization_percent=None),
                    gpu_sample(1, decoder_utilization_percent=None, encoder_utilization_percent=None),
                ]
            )
        ],
    )
    sampler.sweep()

    series = scrape(sampler)

    decoder = "swapline_gpu_decoder_utilization_percent"
    encoder = "swapline_gpu_encoder_utilization_percent"
    assert {key[1]: value for key, value in series.items() if key[0] == decoder} == {gpu_labels(0): 63.0}
    assert [labels for name, labels in series if name == encoder] == []
    assert series[("swapline_gpu_utilization_percent", gpu_labels(1))] == 88.0


class FixedHolders:
    """The kubelet's GPU allocations, as the pod-resources client returns them."""

    def __init__(self, holders: GpuHolders) -> None:
        self.holders = holders

    def list_gpu_holders(self) -> GpuHolders:
        return self.holders

    def close(self) -> None:
        pass


def test_gpus_and_their_processes_carry_the_pods_holding_them(tmp_path: Path) -> None:
    triton = PodRef(namespace="swapline", pod="triton-0", container="triton")
    worker = PodRef(namespace="swapline", pod="worker-a", container="worker")
    notebook = PodRef(namespace="lab", pod="notebook", container="jupyter")
    # GPU 0 is Triton's; GPU 1 is time-sliced between two containers; GPU 2 is nobody's.
    holders = {gpu_sample(0).uuid: (triton,), gpu_sample(1).uuid: (notebook, worker)}
    attributor = PodAttributor(FixedHolders(holders), clock=FakeClock())
    samples = [gpu_sample(0), gpu_sample(1), gpu_sample(2)]
    sampler = sampler_over(
        tmp_path,
        [
            sweep(samples, [gpu_process(0, 4242, used_gib=3.0, sm=64.0), gpu_process(1, 777, sm=None)]),
            sweep(samples, [gpu_process(1, 777, sm=None)]),
        ],
        attributor,
    )
    sampler.sweep()
    series = scrape(sampler)

    held = {dict(labels)["gpu"]: labels for name, labels in series if name == "swapline_gpu_pod_info"}
    pod_info = sorted(labels for name, labels in series if name == "swapline_gpu_pod_info")
    assert pod_info == sorted(
        [
            gpu_labels(0, namespace="swapline", pod="triton-0", container="triton"),
            gpu_labels(1, namespace="swapline", pod="worker-a", container="worker"),
            gpu_labels(1, namespace="lab", pod="notebook", container="jupyter"),
        ]
    )
    assert "2" not in held
    # The per-GPU series stay one per GPU, however many containers share it.
    assert len([labels for name, labels in series if name == "swapline_gpu_utilization_percent"]) == 3

    in_pod = dict(
        gpu="0",
        uuid=gpu_sample(0).uuid,
        node=NODE,
        pid="4242",
        pod="triton-0",
        namespace="swapline",
        container="triton",
    )
    # A process on a shared GPU could belong to either container: it names none.
    shared = {
        **in_pod,
        "gpu": "1",
        "uuid": gpu_sample(1).uuid,
        "pid": "777",
        "pod": "",
        "namespace": "",
        "container": "",
    }
    memory = "swapline_gpu_process_memory_used_bytes"
    sm = "swapline_gpu_process_sm_utilization_percent"
    assert series[(memory, tuple(sorted(in_pod.items())))] == 3 * GIB
    assert series[(sm, tuple(sorted(in_pod.items())))] == 64.0
    assert series[(memory, tuple(sorted(shared.items())))] == 2 * GIB
    assert (sm, tuple(sorted(shared.items()))) not in series

    sampler.sweep()
    pids = {dict(labels)["pid"] for name, labels in scrape(sampler) if name == memory}
    assert pids == {"777"}


def test_nvml_down_exports_zero_with_reason_and_no_gpu_series(tmp_path: Path) -> None:
    sampler = sampler_over(tmp_path, [sweep([gpu_sample(0)]), outage("NVML read failed: GPU is lost")])
    sampler.sweep()
    sampler.sweep()

    series = scrape(sampler)

    assert series[("swapline_gpu_nvml_up", (("reason", "NVML read failed: GPU is lost"),))] == 0.0
    assert names_with(series, "0") == set()
    assert series[("swapline_exporter_nvml_errors_total", ())] == 1.0
    assert series[("swapline_exporter_sweeps_total", ())] == 2.0


def test_xid_counter_and_sweep_histogram(tmp_path: Path) -> None:
    sampler = sampler_over(tmp_path, [sweep([gpu_sample(0)], xid=[(0, 79)]), sweep([gpu_sample(0)], xid=[(0, 79)])])
    sampler.sweep()
    sampler.sweep()

    series = scrape(sampler)

    assert series[("swapline_gpu_xid_errors_total", gpu_labels(0, xid="79"))] == 2.0
    assert series[("swapline_exporter_sweep_seconds_count", ())] == 2.0
    assert series[("swapline_exporter_sweep_seconds_bucket", (("le", "+Inf"),))] == 2.0
    # The fake clock does not move, so both sweeps took 0 s and sit in the smallest bucket.
    assert series[("swapline_exporter_sweep_seconds_bucket", (("le", "0.001"),))] == 2.0


def test_types_in_the_exposition(tmp_path: Path) -> None:
    sampler = sampler_over(tmp_path, [sweep([gpu_sample(0)])])
    sampler.sweep()

    text = scrape_text(sampler)

    assert "# TYPE swapline_gpu_xid_errors_total counter" in text
    assert "# TYPE swapline_gpu_ecc_uncorrected_errors_total counter" in text
    assert "# TYPE swapline_exporter_sweep_seconds histogram" in text
    assert "# TYPE swapline_gpu_utilization_percent gauge" in text
    assert "process_cpu_seconds_total" in text

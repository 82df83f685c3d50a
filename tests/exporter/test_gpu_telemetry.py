from __future__ import annotations

from pathlib import Path

import pynvml
import pytest

from services.common import gpu_telemetry
from services.common.gpu_telemetry import GpuUnavailable, NvmlReader
from services.exporter.gpu_recording import RecordedReader
from tests.exporter.fake_nvml import FakeGpu, FakeNvml
from tests.exporter.telemetry_fixtures import FakeClock, gpu_process, gpu_sample, outage, record, sweep

UUID_A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
UUID_B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml([FakeGpu(uuid=UUID_A), FakeGpu(uuid=UUID_B, gpu_util=3, temperature=40)])
    monkeypatch.setattr(gpu_telemetry, "_nvml", lambda: nvml)
    return nvml


# RecordedReader


def test_recording_round_trips_every_field(tmp_path: Path) -> None:
    samples = [gpu_sample(0, ecc_uncorrected_errors=None), gpu_sample(1, clock_event_reasons=0x44)]
    processes = [gpu_process(0, 4242, sm=None), gpu_process(1, 77)]
    path = record(tmp_path / "rec.jsonl", [sweep(samples, processes, xid=[(1, 79)], driver_version="560.1")])

    reader = RecordedReader(path)

    assert reader.sample_all() == samples
    assert reader.processes() == processes
    assert reader.xid_events() == [(1, 79)]
    assert reader.driver_version() == "560.1"


def test_recording_cycles_by_default_and_ends_without_cycle(tmp_path: Path) -> None:
    path = record(tmp_path / "rec.jsonl", [sweep([gpu_sample(0, utilization_percent=u)]) for u in (10.0, 20.0)])

    cycling = RecordedReader(path)
    assert [cycling.sample_all()[0].utilization_percent for _ in range(5)] == [10.0, 20.0, 10.0, 20.0, 10.0]

    once = RecordedReader(path, cycle=False)
    once.sample_all()
    once.sample_all()
    with pytest.raises(GpuUnavailable, match="recording ended"):
        once.sample_all()


def test_recorded_outage_raises_with_its_reason(tmp_path: Path) -> None:
    path = record(tmp_path / "rec.jsonl", [outage("Driver Not Loaded"), sweep([gpu_sample(0)])])
    reader = RecordedReader(path)

    with pytest.raises(GpuUnavailable) as raised:
        reader.sample_all()
    assert raised.value.reason == "Driver Not Loaded"
    assert reader.xid_events() == []
    assert len(reader.sample_all()) == 1


def test_recorded_reader_with_clock_retimes_samples(tmp_path: Path) -> None:
    path = record(tmp_path / "rec.jsonl", [sweep([gpu_sample(0, timestamp=5.0), gpu_sample(1, timestamp=5.0)])])
    clock = FakeClock(1_800_000_000.0)

    samples = RecordedReader(path, clock=clock).sample_all()

    assert [sample.timestamp for sample in samples] == [1_800_000_000.0, 1_800_000_000.0]


# NvmlReader against a scripted pynvml


def test_nvml_reader_converts_units_and_reads_every_gpu(fake_nvml: FakeNvml) -> None:
    reader = NvmlReader(clock=FakeClock(100.0))

    first, second = reader.sample_all()

    assert (first.index, first.uuid, first.model) == (0, UUID_A, "NVIDIA H100 80GB HBM3")
    assert first.utilization_percent == 90.0
    assert first.memory_utilization_percent == 40.0
    assert first.memory_used_bytes == 30 * 1024**3
    assert first.memory_reserved_bytes == 600 * 1024**2
    assert first.power_watts == pytest.approx(412.5)
    assert first.power_limit_watts == pytest.approx(700.0)
    assert (first.sm_clock_mhz, first.memory_clock_mhz) == (1980, 2619)
    assert first.clock_event_reasons == 0x4
    assert (first.encoder_utilization_percent, first.decoder_utilization_percent) == (10.0, 5.0)
    assert first.ecc_uncorrected_errors == 2
    assert (second.index, second.uuid, second.utilization_percent, second.temperature_celsius) == (
        1,
        UUID_B,
        3.0,
        40.0,
    )
    assert reader.driver_version() == "550.54.15"
    assert fake_nvml.init_calls == 1


def test_nvml_reader_initialises_once_across_sweeps(fake_nvml: FakeNvml) -> None:
    reader = NvmlReader()
    for _ in range(3):
        reader.sample_all()
        reader.processes()
    assert fake_nvml.init_calls == 1
    assert fake_nvml.calls["nvmlDeviceGetUUID"] == 2


def test_pcie_rate_comes_from_byte_counters_between_sweeps(fake_nvml: FakeNvml) -> None:
    clock = FakeClock(100.0)
    reader = NvmlReader(clock=clock)
    assert reader.sample_all()[0].pcie_tx_bytes_per_second == 0.0

    fake_nvml.gpus[0].pcie_tx_counter += 4_000_000
    fake_nvml.gpus[0].pcie_rx_counter += 1_000_000
    clock.advance(2.0)
    sample = reader.sample_all()[0]

    assert sample.pcie_tx_bytes_per_second == pytest.approx(2_000_000)
    assert sample.pcie_rx_bytes_per_second == pytest.approx(500_000)
    assert "nvmlDeviceGetPcieThroughput" not in fake_nvml.calls


def test_pcie_falls_back_to_throughput_in_kib_where_counters_are_missing(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[0].failures["nvmlDeviceGetFieldValues"] = pynvml.NVML_ERROR_NOT_SUPPORTED

    sample = NvmlReader().sample_all()[0]

    assert sample.pcie_tx_bytes_per_second == 1000 * 1024
    assert sample.pcie_rx_bytes_per_second == 500 * 1024


def test_unsupported_reads_leave_neutral_values_and_keep_the_sweep(fake_nvml: FakeNvml) -> None:
    failures = fake_nvml.gpus[1].failures
    failures["nvmlDeviceGetEncoderUtilization"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    failures["nvmlDeviceGetTotalEccErrors"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    failures["nvmlDeviceGetMemoryInfo_v2"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND

    first, second = NvmlReader().sample_all()

    # No reading, rather than a 0 % that would read as an idle NVENC.
    assert second.encoder_utilization_percent is None
    assert first.encoder_utilization_percent == 10.0
    assert second.ecc_uncorrected_errors is None
    assert second.memory_used_bytes == 30 * 1024**3
    assert second.memory_reserved_bytes == 0
    assert second.decoder_utilization_percent == 5.0
    assert first.ecc_uncorrected_errors == 2


def test_nvdec_unreadable_without_permission_is_none_for_that_gpu_only(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[0].failures["nvmlDeviceGetDecoderUtilization"] = pynvml.NVML_ERROR_NO_PERMISSION
    fake_nvml.gpus[1].decoder = 64

    first, second = NvmlReader().sample_all()

    assert (first.decoder_utilization_percent, first.encoder_utilization_percent) == (None, 10.0)
    assert second.decoder_utilization_percent == 64.0


def test_missing_driver_is_unavailable_with_the_reason(fake_nvml: FakeNvml) -> None:
    fake_nvml.init_failure = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    reader = NvmlReader()

    with pytest.raises(GpuUnavailable, match="Driver Not Loaded"):
        reader.sample_all()
    with pytest.raises(GpuUnavailable):
        reader.processes()
    assert reader.xid_events() == []


def test_lost_gpu_makes_nvml_unavailable_and_the_next_sweep_initialises_again(fake_nvml: FakeNvml) -> None:
    reader = NvmlReader()
    reader.sample_all()
    fake_nvml.gpus[1].failures["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_GPU_IS_LOST

    with pytest.raises(GpuUnavailable, match="GPU is lost"):
        reader.sample_all()
    assert fake_nvml.shutdown_calls == 1

    del fake_nvml.gpus[1].failures["nvmlDeviceGetPowerUsage"]
    assert len(reader.sample_all()) == 2
    assert fake_nvml.init_calls == 2


def test_processes_merge_compute_and_graphics_with_latest_sm_utilisation(fake_nvml: FakeNvml) -> None:
    gpu = fake_nvml.gpus[0]
    gpu.compute = [(4242, 3 * 1024**3), (5151, None)]
    gpu.graphics = [(4242, 1024**3)]
    gpu.process_utilization = [(4242, 1_000, 20), (4242, 2_000, 75)]
    reader = NvmlReader()

    processes = reader.processes()

    by_pid = {process.pid: process for process in processes}
    assert set(by_pid) == {4242, 5151}
    assert by_pid[4242].used_memory_bytes == 4 * 1024**3
    assert by_pid[4242].sm_utilization_percent == 75.0
    assert by_pid[5151].used_memory_bytes == 0
    assert by_pid[5151].sm_utilization_percent is None

    # Only samples newer than the last seen one count; with none, the utilisation is unknown.
    assert reader.processes()[0].sm_utilization_percent is None


def test_unsupported_process_utilisation_keeps_process_memory(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[1].compute = [(99, 1024**3)]
    fake_nvml.gpus[1].failures["nvmlDeviceGetProcessUtilization"] = pynvml.NVML_ERROR_NOT_SUPPORTED

    (process,) = NvmlReader().processes()

    assert (process.gpu_index, process.pid, process.used_memory_bytes) == (1, 99, 1024**3)
    assert process.sm_utilization_percent is None


def test_xid_events_are_drained_and_gpus_without_events_are_tolerated(fake_nvml: FakeNvml) -> None:
    fake_nvml.gpus[1].supports_xid_events = False
    reader = NvmlReader()
    reader.sample_all()
    fake_nvml.pending_events = [(0, 79), (0, 48)]

    assert reader.xid_events() == [(0, 79), (0, 48)]
    assert reader.xid_events() == []
    assert fake_nvml.registered == [0]

from __future__ import annotations

from pathlib import Path

from services.common.gpu_telemetry import GpuSample
from services.exporter.gpu_recording import RecordedReader, RecordedSweep, write_recording
from services.residency.gpu_memory import gpu_memory_reader


def sample(index: int, used_bytes: int) -> GpuSample:
    return GpuSample(
        timestamp=0.0,
        index=index,
        uuid=f"GPU-{index}",
        model="NVIDIA H200",
        utilization_percent=0.0,
        memory_utilization_percent=0.0,
        memory_used_bytes=used_bytes,
        memory_total_bytes=150_000_000_000,
        memory_reserved_bytes=0,
        temperature_celsius=30.0,
        power_watts=80.0,
        power_limit_watts=700.0,
        sm_clock_mhz=1980,
        memory_clock_mhz=3201,
        clock_event_reasons=0,
        encoder_utilization_percent=None,
        decoder_utilization_percent=None,
        pcie_tx_bytes_per_second=0.0,
        pcie_rx_bytes_per_second=0.0,
        ecc_uncorrected_errors=None,
    )


def test_the_used_memory_of_the_configured_gpu_is_read(tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "gpu.jsonl", [RecordedSweep(samples=(sample(0, 5), sample(1, 7)))])
    memory = gpu_memory_reader(1, RecordedReader(recording))
    assert memory is not None and memory.used_bytes() == 7


def test_no_readable_gpu_turns_the_budget_off(tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "gpu.jsonl", [RecordedSweep(unavailable_reason="no driver")])
    assert gpu_memory_reader(0, RecordedReader(recording)) is None


def test_a_gpu_index_nvml_lacks_turns_the_budget_off(tmp_path: Path) -> None:
    recording = write_recording(tmp_path / "gpu.jsonl", [RecordedSweep(samples=(sample(0, 5),))])
    assert gpu_memory_reader(3, RecordedReader(recording)) is None

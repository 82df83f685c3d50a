"""A stand-in for the pynvml module: real NVML error classes and constants, scripted GPU answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    gpu_util: int = 90
    memory_util: int = 40
    used: int = 30 * 1024**3
    total: int = 80 * 1024**3
    reserved: int = 600 * 1024**2
    temperature: int = 64
    power_mw: int = 412_500
    power_limit_mw: int = 700_000
    sm_clock: int = 1980
    memory_clock: int = 2619
    clock_events: int = 0x4  # sw_power_cap
    encoder: int = 10
    decoder: int = 5
    ecc_uncorrected: int = 2
    pcie_tx_counter: int = 0
    pcie_rx_counter: int = 0
    pcie_throughput_kb: tuple[int, int] = (1000, 500)
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    process_utilization: list[tuple[int, int, int]] = field(default_factory=list)  # pid, timestamp us, sm
    supports_xid_events: bool = True
    # function name -> NVML error code raised when it is called for this GPU
    failures: dict[str, int] = field(default_factory=dict)


class FakeNvml:
    """Only what NvmlReader calls; anything else (constants, error classes) comes from the real pynvml."""

    def __init__(self, gpus: list[FakeGpu], driver_version: str = "550.54.15") -> None:
        self.gpus = gpus
        self.driver_version = driver_version
        self.init_failure: int | None = None
        self.init_calls = 0
        self.shutdown_calls = 0
        self.pending_events: list[tuple[int, int]] = []
        self.registered: list[int] = []
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(pynvml, name)

    def _gpu(self, handle: int, function: str) -> FakeGpu:
        self.calls[function] = self.calls.get(function, 0) + 1
        gpu = self.gpus[handle]
        if function in gpu.failures:
            raise pynvml.NVMLError(gpu.failures[function])
        return gpu

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_failure is not None:
            raise pynvml.NVMLError(self.init_failure)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetIndex(self, handle: int) -> int:
        return handle

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self._gpu(handle, "nvmlDeviceGetName").name.encode()

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlEventSetFree(self, event_set: str) -> None:
        return None

    def nvmlDeviceGetSupportedEventTypes(self, handle: int) -> int:
        if not self._gpu(handle, "nvmlDeviceGetSupportedEventTypes").supports_xid_events:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(pynvml.nvmlEventTypeXidCriticalError)

    def nvmlDeviceRegisterEvents(self, handle: int, event_types: int, event_set: str) -> None:
        self.registered.append(handle)

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        if not self.pending_events:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        gpu, xid = self.pending_events.pop(0)
        return SimpleNamespace(device=gpu, eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.gpu_util, memory=gpu.memory_util)

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        if version is None:
            gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
            return SimpleNamespace(used=gpu.used, total=gpu.total, free=gpu.total - gpu.used)
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo_v2")
        return SimpleNamespace(used=gpu.used, total=gpu.total, free=gpu.total - gpu.used, reserved=gpu.reserved)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        return gpu.sm_clock if clock == pynvml.NVML_CLOCK_SM else gpu.memory_clock

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").clock_events

    def nvmlDeviceGetEncoderUtilization(self, handle: int) -> list[int]:
        return [self._gpu(handle, "nvmlDeviceGetEncoderUtilization").encoder, 166_666]

    def nvmlDeviceGetDecoderUtilization(self, handle: int) -> list[int]:
        return [self._gpu(handle, "nvmlDeviceGetDecoderUtilization").decoder, 166_666]

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter_type: int) -> int:
        assert error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return self._gpu(handle, "nvmlDeviceGetTotalEccErrors").ecc_uncorrected

    def nvmlDeviceGetFieldValues(self, handle: int, field_ids: list[int]) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        counters = {
            pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES: gpu.pcie_tx_counter,
            pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES: gpu.pcie_rx_counter,
        }
        return [
            SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(ullVal=counters[field_id])) for field_id in field_ids
        ]

    def nvmlDeviceGetPcieThroughput(self, handle: int, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPcieThroughput")
        return gpu.pcie_throughput_kb[0 if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else 1]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.graphics]

    def nvmlDeviceGetProcessUtilization(self, handle: int, since_us: int) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetProcessUtilization")
        found = [
            SimpleNamespace(pid=pid, timeStamp=stamp, smUtil=sm)
            for pid, stamp, sm in gpu.process_utilization
            if stamp > since_us
        ]
        if not found:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return found

"""One small interface for reading GPUs, and NVML's implementation of it.

The exporter samples through it (and replays recordings of it where there is no GPU: services/exporter/
gpu_recording.py); the residency service and Triton's precision choice read GPU memory and names through it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

ValueT = TypeVar("ValueT")


@dataclass(frozen=True)
class GpuSample:
    timestamp: float
    index: int
    uuid: str
    model: str
    utilization_percent: float
    memory_utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    memory_reserved_bytes: int
    temperature_celsius: float
    power_watts: float
    power_limit_watts: float
    sm_clock_mhz: int
    memory_clock_mhz: int
    clock_event_reasons: int
    # NVENC and NVDEC busy share over NVML's last sampling period; None where the GPU cannot report it.
    encoder_utilization_percent: float | None
    decoder_utilization_percent: float | None
    pcie_tx_bytes_per_second: float
    pcie_rx_bytes_per_second: float
    ecc_uncorrected_errors: int | None


@dataclass(frozen=True)
class GpuProcess:
    gpu_index: int
    pid: int
    used_memory_bytes: int
    sm_utilization_percent: float | None


class GpuUnavailable(Exception):
    """NVML cannot be read at all: no driver, no GPU, a lost GPU or an NVML error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GpuReader(Protocol):
    def sample_all(self) -> list[GpuSample]: ...

    def processes(self) -> list[GpuProcess]: ...

    def xid_events(self) -> list[tuple[int, int]]: ...

    def close(self) -> None: ...


@runtime_checkable
class DriverVersionSource(Protocol):
    """Readers that know the driver version (for `swapline_gpu_info`); not part of GpuReader."""

    def driver_version(self) -> str: ...


# NVML answers that mean "this GPU cannot report this field": the field keeps a neutral value.
_FIELD_UNSUPPORTED_CODES = frozenset({3, 4, 13})  # NOT_SUPPORTED, NO_PERMISSION, FUNCTION_NOT_FOUND
_NVML_NOT_FOUND = 6
_NVML_TIMEOUT = 10
_XID_EVENTS_PER_CALL = 256
_KIB = 1024


def _nvml() -> Any:
    # Imported late so hosts without nvidia-ml-py can still use the dataclasses and the recordings.
    import pynvml

    return pynvml


class NvmlReader:
    """Reads every GPU through NVML: initialised once, handles cached, re-initialised after a failure."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._handles: list[Any] = []
        self._identity: list[tuple[str, str]] = []
        self._event_set: Any = None
        self._initialised = False
        self._driver_version = ""
        self._process_timestamps_us: dict[int, int] = {}
        self._pcie_counters: dict[int, tuple[float, int, int]] = {}
        self._pcie_counter_supported: dict[int, bool] = {}

    def _ensure_initialised(self) -> None:
        if self._initialised:
            return
        nvml = _nvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise GpuUnavailable(f"nvmlInit failed: {error}") from error
        self._initialised = True
        try:
            self._driver_version = _text(nvml.nvmlSystemGetDriverVersion())
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                raise GpuUnavailable("NVML reports no GPU")
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
            self._identity = [
                (_text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)))
                for handle in self._handles
            ]
            self._register_xid_events()
        except nvml.NVMLError as error:
            self._shutdown()
            raise GpuUnavailable(f"NVML setup failed: {error}") from error
        except GpuUnavailable:
            self._shutdown()
            raise

    def _register_xid_events(self) -> None:
        nvml = _nvml()
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError:
            return
        registered = False
        for handle in self._handles:
            try:
                supported = nvml.nvmlDeviceGetSupportedEventTypes(handle)
                if supported & nvml.nvmlEventTypeXidCriticalError:
                    nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                    registered = True
            except nvml.NVMLError:
                continue
        if registered:
            self._event_set = event_set
        else:
            nvml.nvmlEventSetFree(event_set)

    def _shutdown(self) -> None:
        nvml = _nvml()
        if self._event_set is not None:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlEventSetFree(self._event_set)
        if self._initialised:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()
        self._handles = []
        self._identity = []
        self._event_set = None
        self._initialised = False
        self._process_timestamps_us.clear()
        self._pcie_counters.clear()
        self._pcie_counter_supported.clear()

    def _guarded(self, read: Callable[[], ValueT]) -> ValueT:
        """Runs a whole sweep; any NVML error that is not a per-field gap makes NVML unavailable."""
        self._ensure_initialised()
        nvml = _nvml()
        try:
            return read()
        except nvml.NVMLError as error:
            self._shutdown()
            raise GpuUnavailable(f"NVML read failed: {error}") from error

    def sample_all(self) -> list[GpuSample]:
        return self._guarded(self._read_samples)

    def processes(self) -> list[GpuProcess]:
        return self._guarded(self._read_processes)

    def driver_version(self) -> str:
        return self._driver_version

    def _read_samples(self) -> list[GpuSample]:
        now = self._clock()
        return [self._read_sample(index, handle, now) for index, handle in enumerate(self._handles)]

    def _read_sample(self, index: int, handle: Any, now: float) -> GpuSample:
        nvml = _nvml()
        uuid, model = self._identity[index]
        utilization = _optional(nvml.nvmlDeviceGetUtilizationRates, None, handle)
        memory = _optional(nvml.nvmlDeviceGetMemoryInfo, None, handle, nvml.nvmlMemory_v2)
        if memory is None:
            memory = _optional(nvml.nvmlDeviceGetMemoryInfo, None, handle)
        encoder = _optional(nvml.nvmlDeviceGetEncoderUtilization, None, handle)
        decoder = _optional(nvml.nvmlDeviceGetDecoderUtilization, None, handle)
        ecc = _optional(
            nvml.nvmlDeviceGetTotalEccErrors,
            None,
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        temperature = _optional(nvml.nvmlDeviceGetTemperature, 0, handle, nvml.NVML_TEMPERATURE_GPU)
        tx_rate, rx_rate = self._pcie_rates(index, handle, now)
        return GpuSample(
            timestamp=now,
            index=index,
            uuid=uuid,
            model=model,
            utilization_percent=float(utilization.gpu) if utilization is not None else 0.0,
            memory_utilization_percent=float(utilization.memory) if utilization is not None else 0.0,
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            memory_total_bytes=int(memory.total) if memory is not None else 0,
            memory_reserved_bytes=int(getattr(memory, "reserved", 0) or 0),
            temperature_celsius=float(temperature),
            power_watts=_optional(nvml.nvmlDeviceGetPowerUsage, 0, handle) / 1000.0,
            power_limit_watts=_optional(nvml.nvmlDeviceGetEnforcedPowerLimit, 0, handle) / 1000.0,
            sm_clock_mhz=int(_optional(nvml.nvmlDeviceGetClockInfo, 0, handle, nvml.NVML_CLOCK_SM)),
            memory_clock_mhz=int(_optional(nvml.nvmlDeviceGetClockInfo, 0, handle, nvml.NVML_CLOCK_MEM)),
            clock_event_reasons=int(_optional(nvml.nvmlDeviceGetCurrentClocksEventReasons, 0, handle)),
            encoder_utilization_percent=float(encoder[0]) if encoder is not None else None,
            decoder_utilization_percent=float(decoder[0]) if decoder is not None else None,
            pcie_tx_bytes_per_second=tx_rate,
            pcie_rx_bytes_per_second=rx_rate,
            ecc_uncorrected_errors=int(ecc) if ecc is not None else None,
        )

    def _pcie_rates(self, index: int, handle: Any, now: float) -> tuple[float, float]:
        """PCIe bytes per second in each direction.

        Prefers NVML's cumulative PCIe byte counters (one cheap field read; the rate is the delta
        since the last sweep) because nvmlDeviceGetPcieThroughput samples for 20 ms per direction
        inside the call, which alone would break a 5 ms sweep. Falls back to it where the counters
        are missing.
        """
        nvml = _nvml()
        if self._pcie_counter_supported.get(index, True):
            counters = self._pcie_byte_counters(handle)
            if counters is not None:
                self._pcie_counter_supported[index] = True
                previous = self._pcie_counters.get(index)
                self._pcie_counters[index] = (now, counters[0], counters[1])
                if previous is None or now <= previous[0]:
                    return 0.0, 0.0
                elapsed = now - previous[0]
                return (
                    max(0.0, (counters[0] - previous[1]) / elapsed),
                    max(0.0, (counters[1] - previous[2]) / elapsed),
                )
            self._pcie_counter_supported[index] = False
        tx = _optional(nvml.nvmlDeviceGetPcieThroughput, 0, handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
        rx = _optional(nvml.nvmlDeviceGetPcieThroughput, 0, handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
        return float(tx * _KIB), float(rx * _KIB)

    @staticmethod
    def _pcie_byte_counters(handle: Any) -> tuple[int, int] | None:
        nvml = _nvml()
        fields = [nvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, nvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES]
        values = _optional(nvml.nvmlDeviceGetFieldValues, None, handle, fields)
        if values is None or any(value.nvmlReturn != 0 for value in values):
            return None
        return int(values[0].value.ullVal), int(values[1].value.ullVal)

    def _read_processes(self) -> list[GpuProcess]:
        nvml = _nvml()
        processes: list[GpuProcess] = []
        for index, handle in enumerate(self._handles):
            used_by_pid: dict[int, int] = {}
            running = [
                *_optional(nvml.nvmlDeviceGetComputeRunningProcesses, [], handle),
                *_optional(nvml.nvmlDeviceGetGraphicsRunningProcesses, [], handle),
            ]
            for info in running:
                # usedGpuMemory is None where the driver cannot tell (no permission, WDDM).
                used_by_pid[int(info.pid)] = used_by_pid.get(int(info.pid), 0) + int(info.usedGpuMemory or 0)
            sm_by_pid = self._process_sm_utilization(index, handle) if used_by_pid else {}
            processes.extend(
                GpuProcess(
                    gpu_index=index,
                    pid=pid,
                    used_memory_bytes=used,
                    sm_utilization_percent=sm_by_pid.get(pid),
                )
                for pid, used in sorted(used_by_pid.items())
            )
        return processes

    def _process_sm_utilization(self, index: int, handle: Any) -> dict[int, float]:
        nvml = _nvml()
        since = self._process_timestamps_us.get(index, 0)
        try:
            utilization_samples = nvml.nvmlDeviceGetProcessUtilization(handle, since)
        except nvml.NVMLError as error:
            if error.value in _FIELD_UNSUPPORTED_CODES or error.value == _NVML_NOT_FOUND:
                return {}
            raise
        latest: dict[int, tuple[int, float]] = {}
        for sample in utilization_samples:
            pid, stamp = int(sample.pid), int(sample.timeStamp)
            if pid not in latest or stamp > latest[pid][0]:
                latest[pid] = (stamp, float(sample.smUtil))
        if latest:
            self._process_timestamps_us[index] = max(stamp for stamp, _ in latest.values())
        return {pid: utilization for pid, (_, utilization) in latest.items()}

    def xid_events(self) -> list[tuple[int, int]]:
        if not self._initialised or self._event_set is None:
            return []
        nvml = _nvml()
        events: list[tuple[int, int]] = []
        for _ in range(_XID_EVENTS_PER_CALL):
            try:
                data = nvml.nvmlEventSetWait(self._event_set, 0)
            except nvml.NVMLError as error:
                if error.value != _NVML_TIMEOUT:
                    self._event_set = None
                break
            if data.eventType == nvml.nvmlEventTypeXidCriticalError:
                events.append((self._index_of(data.device), int(data.eventData)))
        return events

    def _index_of(self, device: Any) -> int:
        nvml = _nvml()
        try:
            return int(nvml.nvmlDeviceGetIndex(device))
        except nvml.NVMLError:
            return -1

    def close(self) -> None:
        self._shutdown()


def _optional(read: Callable[..., Any], neutral: Any, *arguments: Any) -> Any:
    """One NVML read that a GPU may not support; the neutral value stands in for it."""
    nvml = _nvml()
    try:
        return read(*arguments)
    except nvml.NVMLError as error:
        if error.value in _FIELD_UNSUPPORTED_CODES:
            return neutral
        raise
    except nvml.NVMLLibraryMismatchError:
        return neutral


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value

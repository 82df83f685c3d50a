"""The used memory of one GPU through NVML (services/common/gpu_telemetry), or None where there is no GPU."""

from __future__ import annotations

import logging

from services.common.gpu_telemetry import GpuReader, GpuUnavailable, NvmlReader

log = logging.getLogger(__name__)


class GpuMemoryReader:
    """One GPU's used memory, read from a sweep of `reader` (NVML by default)."""

    def __init__(self, gpu_index: int, reader: GpuReader | None = None) -> None:
        self.gpu_index = gpu_index
        self._reader = reader or NvmlReader()

    def used_bytes(self) -> int:
        for sample in self._reader.sample_all():
            if sample.index == self.gpu_index:
                return sample.memory_used_bytes
        raise GpuUnavailable(f"NVML reports no GPU {self.gpu_index}")

    def close(self) -> None:
        self._reader.close()


def gpu_memory_reader(gpu_index: int, reader: GpuReader | None = None) -> GpuMemoryReader | None:
    """The reader of GPU `gpu_index`, or None (with the reason logged) when it cannot be read: no budget check."""
    memory = GpuMemoryReader(gpu_index, reader)
    try:
        memory.used_bytes()
    except GpuUnavailable as error:
        log.warning("no GPU memory to budget (%s): models load without a budget check", error.reason)
        memory.close()
        return None
    return memory

"""How a process's threads wait for its GPU: by sleeping, by default, rather than by spinning on a core.

CUDA's default (`auto`) spins a waiting thread on its core whenever a process has fewer CUDA contexts than the
machine has cores, which is every process of this stack: each worker, decoder and Triton stub then burns a
core for as long as the GPU takes, while libx264 in the encoders needs every core there is (the GPU benchmark
in docs/benchmarks.md). `block` makes waiting threads sleep on a synchronisation primitive instead, at the
price of a wake-up (tens of microseconds) per wait. The choice is made through the primary context's flags,
which the CUDA runtime, torch and PyNvVideoCodec share, so it must be applied before any of them makes the
context: at a process's start.

The worker, the decoder and Triton's stubs each take it as a setting (SWAPLINE_WORKER_CUDA_WAIT,
SWAPLINE_DECODER_CUDA_WAIT, SWAPLINE_TRITON_CUDA_WAIT: one of CUDA_WAITS, block by default).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any, Literal, get_args

log = logging.getLogger(__name__)

CudaWait = Literal["block", "yield", "spin", "auto"]
CUDA_WAITS: tuple[CudaWait, ...] = get_args(CudaWait)
# CU_CTX_SCHED_* from cuda.h.
SCHEDULING_FLAGS: dict[CudaWait, int] = {"auto": 0, "spin": 1, "yield": 2, "block": 4}
CUDA_DRIVER_LIBRARY = "libcuda.so.1"


def apply_cuda_wait(wait: CudaWait, load: Callable[[str], Any] = ctypes.CDLL) -> int:
    """Sets every visible GPU's primary context to `wait`; the number of GPUs set, 0 where there is no driver.

    A driver that loads but refuses is logged and left as it is: waiting by spinning is slower, not wrong.
    """
    try:
        cuda = load(CUDA_DRIVER_LIBRARY)
    except OSError:
        return 0
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        log.warning("the CUDA driver did not start, so GPU waits are left at CUDA's default")
        return 0
    flags = SCHEDULING_FLAGS[wait]
    for ordinal in range(count.value):
        device = ctypes.c_int()
        if (
            cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0
            or cuda.cuDevicePrimaryCtxSetFlags_v2(device, flags) != 0
        ):
            log.warning("GPU %d refused the %s wait, so it keeps CUDA's default", ordinal, wait)
            return ordinal
    log.info("threads wait for the GPU: %s (%d GPU(s))", wait, count.value)
    return count.value

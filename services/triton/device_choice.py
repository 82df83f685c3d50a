"""Which device the embedded tritonserver serves the models on: "auto" asks whether torch sees a GPU.

The answer comes from a short child process, so the process that starts tritonserver never imports
torch (seconds and hundreds of MB). The cheap checks run first: without torch installed, or without
an NVIDIA device node, the answer is "cpu" at once, so a CPU machine's start-up pays nothing for it.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from services.triton.embedded_repository import TritonDevice

log = logging.getLogger(__name__)

TritonDeviceChoice = Literal["auto", TritonDevice]
TRITON_DEVICE_CHOICES: tuple[TritonDeviceChoice, ...] = get_args(TritonDeviceChoice)

DEVICE_DIR = Path("/dev")
NVIDIA_DEVICE_PATTERN = "nvidia[0-9]*"
# Importing torch and creating no CUDA context: a few seconds on a cold disk.
PROBE_TIMEOUT_SECONDS = 60.0
PROBE_SCRIPT = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
PROBE_ERROR_CHARS = 300


@dataclass(frozen=True)
class CudaProbe:
    available: bool
    reason: str
    # GPUs torch sees (CUDA_VISIBLE_DEVICES applied): what the embedded stack spreads its workers over.
    device_count: int = 0


def probe_cuda(
    device_dir: Path = DEVICE_DIR, python: str = sys.executable, timeout: float = PROBE_TIMEOUT_SECONDS
) -> CudaProbe:
    """Whether torch, in `python` (this interpreter, whose environment Triton's stubs use), sees a GPU."""
    if importlib.util.find_spec("torch") is None:
        return CudaProbe(False, "torch is not installed")
    if not any(device_dir.glob(NVIDIA_DEVICE_PATTERN)):
        return CudaProbe(False, f"no NVIDIA device in {device_dir}")
    try:
        completed = subprocess.run(
            [python, "-c", PROBE_SCRIPT], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return CudaProbe(False, f"torch's CUDA check did not answer within {timeout:g} s")
    if completed.returncode != 0:
        error = completed.stderr.strip()[-PROBE_ERROR_CHARS:]
        return CudaProbe(False, f"torch's CUDA check failed with code {completed.returncode}: {error}")
    answer = completed.stdout.strip()
    if not answer.isdigit():
        return CudaProbe(False, f"torch's CUDA check answered {answer[:PROBE_ERROR_CHARS]!r}")
    if int(answer) == 0:
        return CudaProbe(False, "torch sees no CUDA device")
    return CudaProbe(True, f"torch sees {answer} CUDA device(s)", int(answer))


@dataclass(frozen=True)
class DeviceDecision:
    device: TritonDevice
    reason: str


def resolve_device(choice: TritonDeviceChoice, probe: Callable[[], CudaProbe] = probe_cuda) -> DeviceDecision:
    """The device a choice means here; "auto" runs the probe. The decision is logged with its reason."""
    if choice == "auto":
        found = probe()
        decision = DeviceDecision("cuda" if found.available else "cpu", found.reason)
    else:
        decision = DeviceDecision(choice, "as configured")
    log.info("triton serves the models on %s: %s", decision.device, decision.reason)
    return decision

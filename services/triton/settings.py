"""Settings of `python -m services.triton`, read from SWAPLINE_TRITON_* variables.

Not a ServerSettings: this process hosts tritonserver's own gRPC, HTTP and metrics endpoints,
with Triton's conventional ports, rather than a swapline gRPC service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.cuda_waiting import CudaWait
from services.common.settings_loader import ValidatedSettings, env_name, load_settings, ranged
from services.triton.device_choice import TritonDeviceChoice

ENV_PREFIX = "SWAPLINE_TRITON_"


@dataclass(frozen=True, kw_only=True)
class TritonSettings(ValidatedSettings):
    model_repository: Path = Path("triton_models")
    work_dir: Path = Path("build/triton")
    grpc_port: int = ranged(8001, ge=1, le=65535)
    http_port: int = ranged(8000, ge=1, le=65535)
    metrics_port: int = ranged(8002, ge=1, le=65535)
    # Empty serves every model in the repository.
    models: tuple[str, ...] = ()
    startup_timeout: float = ranged(120.0, gt=0.0)
    intra_op_threads: int = ranged(0, ge=0, le=256)
    log_path: Path | None = None
    # "auto": CUDA (the built-in models in torch, FP16) when torch sees a GPU, else the CPU (onnxruntime).
    device: TritonDeviceChoice = "auto"
    # Stub processes per built-in model on each GPU when serving on CUDA. A Python-backend stub runs its
    # batches one at a time, so with one the swapper's and the cascade's CPU-side work (tensor copies,
    # pre- and post-processing) serialises every worker's requests; more let batches overlap on the GPU.
    gpu_instances: int = ranged(1, ge=1, le=16)
    # How a GPU stub's threads wait for the GPU (services/common/cuda_waiting.py): block sleeps, CUDA's own
    # auto spins a core for as long as each batch runs.
    cuda_wait: CudaWait = "block"


def _one_setting(field_name: str, environ: Mapping[str, str] | None) -> TritonSettings:
    source = os.environ if environ is None else environ
    name = env_name(ENV_PREFIX, field_name)
    chosen = {name: source[name]} if name in source else {}
    return load_settings(TritonSettings, ENV_PREFIX, chosen)


def gpu_instances_from_env(environ: Mapping[str, str] | None = None) -> int:
    """SWAPLINE_TRITON_GPU_INSTANCES from `environ` (default: this process's), checked as TritonSettings checks
    it; 1 when unset. How a process that runs the embedded tritonserver itself (`swapline up`, the benchmarks)
    takes the setting: it reads none of the other SWAPLINE_TRITON_* variables, so only this one is checked."""
    return _one_setting("gpu_instances", environ).gpu_instances


def cuda_wait_from_env(environ: Mapping[str, str] | None = None) -> CudaWait:
    """SWAPLINE_TRITON_CUDA_WAIT, read as gpu_instances_from_env reads its variable: by the embedded stack, and
    by each GPU stub, which tritonserver starts with this variable set."""
    return _one_setting("cuda_wait", environ).cuda_wait

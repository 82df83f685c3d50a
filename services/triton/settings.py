"""Settings of `python -m services.triton`, read from SWAPLINE_TRITON_* variables.

Not a ServerSettings: this process hosts tritonserver's own gRPC, HTTP and metrics endpoints,
with Triton's conventional ports, rather than a swapline gRPC service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.settings_loader import ValidatedSettings, ranged
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

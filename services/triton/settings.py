"""Settings of `python -m services.triton`, read from SWAPLINE_TRITON_* variables.

Not a ServerSettings: this process hosts tritonserver's own gRPC, HTTP and metrics endpoints,
with Triton's conventional ports, rather than a swapline gRPC service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "SWAPLINE_TRITON_"


@dataclass(frozen=True, kw_only=True)
class TritonSettings:
    model_repository: Path = Path("triton_models")
    work_dir: Path = Path("build/triton")
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    # Empty serves every model in the repository.
    models: tuple[str, ...] = ()
    startup_timeout: float = 120.0
    intra_op_threads: int = 0
    log_path: Path | None = None

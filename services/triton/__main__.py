"""`python -m services.triton`: the embedded tritonserver in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from services.common.settings_check import service_settings
from services.triton.server_process import EmbeddedTriton
from services.triton.settings import ENV_PREFIX, TritonSettings


def main() -> None:
    settings = service_settings("triton", TritonSettings, ENV_PREFIX)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    triton = EmbeddedTriton(
        settings.model_repository.resolve(),
        settings.work_dir.resolve(),
        grpc_port=settings.grpc_port,
        http_port=settings.http_port,
        metrics_port=settings.metrics_port,
        log_path=settings.log_path,
        startup_timeout=settings.startup_timeout,
        models=settings.models or None,
        intra_op_threads=settings.intra_op_threads,
        device=settings.device,
        gpu_instances=settings.gpu_instances,
        cuda_wait=settings.cuda_wait,
    )
    with triton:
        print(
            f"triton listening on grpc {triton.grpc_url} http {triton.http_url} metrics {triton.metrics_url}"
            f" serving {', '.join(triton.models)} on {triton.device} ({triton.device_reason})",
            flush=True,
        )
        # alive() also ends the stubs and removes the /dev/shm regions of a server that died.
        while not stop_requested.is_set() and triton.alive():
            stop_requested.wait(timeout=1.0)
    if not stop_requested.is_set():
        raise SystemExit(f"tritonserver exited on its own; see {triton.log_path}")


if __name__ == "__main__":
    main()

"""The whole system on one machine: the real tritonserver and every service as its own process.

Used by `swapline run` (when SWAPLINE_GATEWAY is not set), `swapline up`, the end-to-end tests and
the benchmark. Services listen on port 0 and print the port they bound; the stack reads it back.
The frame services (decoder, detector, encoder) also listen on Unix sockets, which their clients use
by default: every process is on this machine, and raw frames then skip the TCP stack.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Literal, get_args

from services.common.errors import Unavailable
from services.triton.server_process import EmbeddedTriton, free_ports

log = logging.getLogger(__name__)

FrameTransport = Literal["unix", "tcp"]
FRAME_TRANSPORTS: tuple[FrameTransport, ...] = get_args(FrameTransport)
FRAME_SERVICES = ("decoder", "detector", "encoder")

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPOSITORY_ROOT / "triton_models"
_LISTENING = re.compile(r"listening on (?P<host>[^\s:]+):(?P<port>\d+)")


def _drain(stream: IO[str], sink: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()
        lines.put(line)
    lines.put(None)


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[str]
    log_path: Path
    address: str = ""
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def wait_listening(self, timeout: float) -> str:
        """Blocks until the service prints its bound address; fails with its log if it dies first."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise Unavailable(f"{self.name} did not start within {timeout:.0f} s; log: {self.log_path}") from None
            if line is None:
                raise Unavailable(f"{self.name} exited with {self.process.wait()} during start:\n{self.log_tail()}")
            match = _LISTENING.search(line)
            if match:
                self.address = f"{match['host']}:{match['port']}"
                return self.address

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_service(name: str, env: Mapping[str, str], log_dir: Path) -> ServiceProcess:
    log_path = log_dir / f"{name}.log"
    sink = log_path.open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{name.split('-')[0]}"],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPOSITORY_ROOT,
        start_new_session=True,
    )
    service = ServiceProcess(name=name, process=process, log_path=log_path)
    assert process.stdout is not None
    threading.Thread(target=_drain, args=(process.stdout, sink, service._lines), daemon=True).start()
    return service


def frame_service_sockets(socket_dir: Path | None) -> dict[str, tuple[dict[str, str], str]]:
    """Per frame service: the environment that makes it listen on a Unix socket in socket_dir, and the
    target its clients use ("": its TCP address). No socket_dir: TCP only."""
    if socket_dir is None:
        return {name: ({}, "") for name in FRAME_SERVICES}
    paths = {name: socket_dir / f"{name}.sock" for name in FRAME_SERVICES}
    return {name: ({f"SWAPLINE_{name.upper()}_UNIX_SOCKET": str(path)}, f"unix:{path}") for name, path in paths.items()}


def _server_env(prefix: str, port: int = 0) -> dict[str, str]:
    return {f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": str(port), f"{prefix}METRICS_PORT": "0"}


@dataclass
class StackOptions:
    work_dir: Path
    media_root: Path
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    gateway_port: int = 0
    # Two workers keep both cores of a small machine busy while one of them waits on a stage:
    # `make bench` measures 5-10% more frames a second than with one.
    workers: int = 2
    worker_batch_size: int = 8
    # One onnxruntime thread per model instance: the CPU models serve small requests, and four
    # model processes beside the services would otherwise contend for the same cores.
    triton_intra_op_threads: int = 1
    # How workers and the gateway reach the frame services: "tcp" is how a cluster's pods do.
    frame_transport: FrameTransport = "unix"
    startup_timeout: float = 120.0
    extra_env: dict[str, str] = field(default_factory=dict)


class EmbeddedStack:
    """Starts Triton, decoder, detector, encoder, the GPU exporter, gateway and workers; stops them in reverse.

    The exporter samples this machine's GPUs into a trend log that the gateway charts each job from;
    without a GPU it keeps running with swapline_gpu_nvml_up 0 and every report says CPU mode.
    """

    def __init__(self, options: StackOptions) -> None:
        self.options = replace(options, work_dir=options.work_dir.resolve(), media_root=options.media_root.resolve())
        self.triton: EmbeddedTriton | None = None
        self.services: dict[str, ServiceProcess] = {}
        self.log_dir = options.work_dir / "logs"
        # Not under work_dir: a Unix socket path must stay within 107 bytes.
        self._socket_dir: Path | None = None
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton-start")

    @property
    def gateway_address(self) -> str:
        return self.services["gateway"].address

    @property
    def exporter_address(self) -> str:
        """host:port of the exporter's /metrics and /healthz."""
        return self.services["exporter"].address

    @property
    def trend_dir(self) -> Path:
        return (self.options.work_dir / "gpu-trend").resolve()

    def _start_tier(self, envs: Mapping[str, Mapping[str, str]]) -> None:
        started = {name: start_service(name, {**env, **self.options.extra_env}, self.log_dir)
                   for name, env in envs.items()}
        self.services.update(started)
        for service in started.values():
            service.wait_listening(self.options.startup_timeout)
            log.info("%s at %s", service.name, service.address)

    def start(self) -> EmbeddedStack:
        options = self.options
        self.log_dir.mkdir(parents=True, exist_ok=True)
        options.media_root.mkdir(parents=True, exist_ok=True)
        media_root = str(options.media_root.resolve())
        self.triton = EmbeddedTriton(
            options.model_repository,
            options.work_dir / "triton",
            log_path=self.log_dir / "triton.log",
            intra_op_threads=options.triton_intra_op_threads,
        )
        try:
            triton_ready = self._starter.submit(self.triton.start)
            triton_url = self.triton.grpc_url
            sockets = self._frame_sockets()
            frame_service_env = {
                "decoder": {"SWAPLINE_DECODER_MEDIA_ROOT": media_root},
                "encoder": {"SWAPLINE_ENCODER_MEDIA_ROOT": media_root},
                # Triton runs on this machine: tensors go through shared memory, not gRPC.
                "detector": {
                    "SWAPLINE_DETECTOR_TRITON_URL": triton_url,
                    "SWAPLINE_DETECTOR_TRITON_SHARED_MEMORY": "true",
                },
            }
            self._start_tier({
                **{
                    name: {**_server_env(f"SWAPLINE_{name.upper()}_"), **sockets[name][0], **env}
                    for name, env in frame_service_env.items()
                },
                "exporter": {
                    **_server_env("SWAPLINE_EXPORTER_"),
                    "SWAPLINE_EXPORTER_TREND_DIR": str(self.trend_dir),
                    "SWAPLINE_EXPORTER_REPLAY": "",
                    # One machine, no Kubernetes API to ask which pod a GPU process belongs to.
                    "SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION": "false",
                },
            })
            # The gateway and the advisor call each other: the advisor's port is chosen first.
            advisor_address = f"127.0.0.1:{free_ports(1)[0]}"
            targets = {
                f"{name.upper()}_TARGET": sockets[name][1] or self.services[name].address for name in FRAME_SERVICES
            }
            self._start_tier({
                "gateway": {
                    **_server_env("SWAPLINE_GATEWAY_", options.gateway_port),
                    "SWAPLINE_GATEWAY_MEDIA_ROOT": media_root,
                    "SWAPLINE_GATEWAY_GPU_TREND_SOURCE": "trend_log",
                    "SWAPLINE_GATEWAY_TREND_DIR": str(self.trend_dir),
                    "SWAPLINE_GATEWAY_ADVISOR_TARGET": advisor_address,
                    **{f"SWAPLINE_GATEWAY_{key}": value for key, value in targets.items()},
                }
            })
            self._start_tier({
                "advisor": {
                    **_server_env("SWAPLINE_ADVISOR_", int(advisor_address.rsplit(":", 1)[1])),
                    "SWAPLINE_ADVISOR_GATEWAY_TARGET": self.gateway_address,
                }
            })
            # Triton loads models while the CPU services start; workers need it serving.
            triton_ready.result()
            self._start_tier({
                f"worker-{index}": {
                    **_server_env("SWAPLINE_WORKER_"),
                    "SWAPLINE_WORKER_GATEWAY_TARGET": self.gateway_address,
                    "SWAPLINE_WORKER_TRITON_URL": triton_url,
                    "SWAPLINE_WORKER_TRITON_SHARED_MEMORY": "true",
                    "SWAPLINE_WORKER_WORKER_ID": f"embedded-worker-{index}",
                    "SWAPLINE_WORKER_BATCH_SIZE": str(options.worker_batch_size),
                    **{f"SWAPLINE_WORKER_{key}": value for key, value in targets.items()},
                }
                for index in range(options.workers)
            })
        except BaseException:
            self.stop()
            raise
        return self

    def _frame_sockets(self) -> dict[str, tuple[dict[str, str], str]]:
        if self.options.frame_transport == "unix":
            self._socket_dir = Path(tempfile.mkdtemp(prefix="swapline-"))
        return frame_service_sockets(self._socket_dir)

    def stop(self, timeout: float = 20.0) -> None:
        for service in reversed(list(self.services.values())):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in reversed(list(self.services.values())):
            try:
                service.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not drain in %.0f s; killing it", service.name, timeout)
                service.process.kill()
                service.process.wait()
        self.services.clear()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

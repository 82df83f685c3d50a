"""The whole system on one machine: the real tritonserver and every service as its own process.

Used by `swapline run` (when SWAPLINE_GATEWAY is not set), `swapline up`, the end-to-end tests and
the benchmark. Services listen on port 0 and print the port they bound; the stack reads it back.
The frame services (decoder, detector, encoder) also listen on Unix sockets, which their clients use
by default: every process is on this machine, and raw frames then skip the TCP stack.

The stack supervises its children (process_supervisor.py): one that dies is started again on the
same address, so its clients reconnect.

By default every service runs open (plaintext, no tokens, every job belongs to the tenant "local"),
which is why everything listens on loopback only. `StackOptions.secure` generates a private CA, a
service certificate and tokens, and runs every service with TLS and token authentication.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from services.cli.gpu_layout import (
    GpuLayout,
    available_cores,
    decoder_gpu_env,
    plan_gpu_layout,
    worker_gpu_env,
)
from services.cli.job_client import JobClient
from services.cli.process_supervisor import (
    REPOSITORY_ROOT,
    TRITON_NAME,
    ProcessSupervisor,
    ServiceProcess,
    ServiceRestart,
    service_env_prefix,
)
from services.cli.stack_credentials import DEFAULT_TENANTS, StackCredentials, generate_credentials
from services.common.cuda_waiting import CudaWait
from services.common.errors import FailedPrecondition
from services.common.grpc_channel import CA_FILE_ENV, TOKEN_ENV
from services.common.server_settings import TransportSecurity
from services.common.torch_catalog import BUILT_IN_FACTORIES
from services.model_build.model_sets import default_set_models
from services.triton.device_choice import TritonDeviceChoice, probe_cuda
from services.triton.server_process import EmbeddedTriton, free_ports
from services.triton.settings import cuda_wait_from_env, gpu_instances_from_env

FrameTransport = Literal["unix", "tcp"]
FRAME_TRANSPORTS: tuple[FrameTransport, ...] = get_args(FrameTransport)
FRAME_SERVICES = ("decoder", "detector", "encoder")
GATEWAY_ENV = "SWAPLINE_GATEWAY"
DEFAULT_MODEL_REPOSITORY = REPOSITORY_ROOT / "triton_models"
__all__ = [
    "DEFAULT_MODEL_REPOSITORY",
    "FRAME_SERVICES",
    "FRAME_TRANSPORTS",
    "GATEWAY_ENV",
    "REPOSITORY_ROOT",
    "TRITON_NAME",
    "EmbeddedStack",
    "FrameTransport",
    "ServiceRestart",
    "StackOptions",
    "frame_service_sockets",
    "security_env",
]


def replica_name(service: str, replica: int) -> str:
    """`decoder` for the first replica, then `decoder-2`, `decoder-3`...: the supervisor's names for them."""
    return service if replica == 0 else f"{service}-{replica + 1}"


def frame_service_sockets(socket_dir: Path | None, replicas: int = 1) -> dict[str, tuple[dict[str, str], str]]:
    """Per frame service replica: the environment that makes it listen on a Unix socket in socket_dir, and
    the target its clients use ("": its TCP address). No socket_dir: TCP only."""
    names = [replica_name(service, replica) for service in FRAME_SERVICES for replica in range(replicas)]
    if socket_dir is None:
        return {name: ({}, "") for name in names}
    paths = {name: socket_dir / f"{name}.sock" for name in names}
    return {
        name: ({f"{service_env_prefix(name)}UNIX_SOCKET": str(path)}, f"unix:{path}") for name, path in paths.items()
    }


def security_env(prefix: str, credentials: StackCredentials | None, mutual_tls: bool = False) -> dict[str, str]:
    """No credentials: plaintext and open. Otherwise TLS (or mutual TLS) and token authentication."""
    if credentials is None:
        return {f"{prefix}TRANSPORT_SECURITY": "plaintext", f"{prefix}AUTH_MODE": "open"}
    transport: TransportSecurity = "mtls" if mutual_tls else "tls"
    return {
        f"{prefix}TRANSPORT_SECURITY": transport,
        f"{prefix}AUTH_MODE": "token",
        f"{prefix}TLS_CERT_FILE": str(credentials.cert_file),
        f"{prefix}TLS_KEY_FILE": str(credentials.key_file),
        f"{prefix}TLS_CA_FILE": str(credentials.ca_file),
        f"{prefix}TENANT_TOKENS_FILE": str(credentials.tenant_tokens_file),
        f"{prefix}INTERNAL_TOKEN_FILE": str(credentials.internal_token_file),
    }


def _server_env(prefix: str, port: int = 0) -> dict[str, str]:
    """Loopback; the metrics port is chosen up front so that it stays the same across restarts."""
    return {
        f"{prefix}HOST": "127.0.0.1",
        f"{prefix}PORT": str(port),
        f"{prefix}METRICS_PORT": str(free_ports(1)[0]),
    }


@dataclass
class StackOptions:
    work_dir: Path
    media_root: Path
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    gateway_port: int = 0
    # None: sized to the machine by services/cli/gpu_layout.py, WORKERS_PER_GPU on each GPU while the cores last,
    # and two without a GPU (they keep both cores of a small machine busy while one waits on a stage).
    workers: int | None = None
    worker_batch_size: int = 8
    # One onnxruntime thread per model instance: the CPU models serve small requests, and four
    # model processes beside the services would otherwise contend for the same cores.
    triton_intra_op_threads: int = 1
    # "auto": the models on CUDA (torch, FP16) when torch sees a GPU, else on the CPU (onnxruntime).
    triton_device: TritonDeviceChoice = "auto"
    # Stubs per built-in model on each GPU when the models run on CUDA: SWAPLINE_TRITON_GPU_INSTANCES in
    # this process's environment (1 when unset), as `python -m services.triton` reads it for its own server.
    triton_gpu_instances: int = field(default_factory=gpu_instances_from_env)
    # How Triton's GPU stubs wait for the GPU: SWAPLINE_TRITON_CUDA_WAIT from this process's environment.
    triton_cuda_wait: CudaWait = field(default_factory=cuda_wait_from_env)
    # How workers and the gateway reach the frame services: "tcp" is how a cluster's pods do.
    frame_transport: FrameTransport = "unix"
    # Processes of each frame service (decoder, detector, encoder); worker i uses replica i mod this.
    # A frame service's per-frame copies hold its GIL: on the 16-core GPU machine one decoder process
    # topped out near 72 fps of 1080p however many workers fed on it (docs/benchmarks.md).
    # None: gpu_layout's default, FRAME_SERVICE_REPLICAS_PER_GPU on each GPU while the cores last, one without a GPU.
    frame_service_replicas: int | None = None
    # Frames between the decoder, the workers and the encoder through files in a private directory under /dev/shm
    # (services/common/frames/frame_memory.py) instead of in the messages: every service runs on this machine.
    frame_memory: bool = True
    startup_timeout: float = 120.0
    # GPU memory Triton's models may hold together, in bytes; the residency service unloads the least
    # recently used imported models to stay within it. 0, or no GPU: no budget.
    gpu_memory_budget_bytes: int = 0
    # TLS on every listener and bearer tokens (credentials generated in work_dir/credentials).
    secure: bool = False
    # With `secure`: services also prove themselves to each other with the service certificate.
    mutual_tls: bool = False
    # With `secure`: the tenants that get a token.
    tenants: tuple[str, ...] = DEFAULT_TENANTS
    extra_env: dict[str, str] = field(default_factory=dict)


class EmbeddedStack:
    """Starts Triton, decoder, detector, encoder, the GPU exporter, gateway and workers; stops them in reverse.

    The exporter samples this machine's GPUs into a trend log that the gateway charts each job from;
    without a GPU it keeps running with swapline_gpu_nvml_up 0 and every report says CPU mode.
    `on_restart` is called, from a supervisor thread, whenever a restarted child serves again.
    """

    def __init__(self, options: StackOptions, on_restart: Callable[[ServiceRestart], None] | None = None) -> None:
        self.options = replace(options, work_dir=options.work_dir.resolve(), media_root=options.media_root.resolve())
        self.triton: EmbeddedTriton | None = None
        self.credentials: StackCredentials | None = None
        self.log_dir = self.options.work_dir / "logs"
        self.supervisor = ProcessSupervisor(self.log_dir, self.options.startup_timeout, on_restart)
        # Not under work_dir: a Unix socket path must stay within 107 bytes.
        self._socket_dir: Path | None = None
        self._frame_memory_dir: Path | None = None
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton-start")
        self._layout: GpuLayout | None = None

    @property
    def layout(self) -> GpuLayout:
        """How many workers and frame-service replicas the started stack runs, and on which GPUs."""
        if self._layout is None:
            raise FailedPrecondition("the embedded stack has not started: its layout is chosen at start")
        return self._layout

    @property
    def gateway_address(self) -> str:
        return self.supervisor.service("gateway").address

    @property
    def exporter_address(self) -> str:
        """host:port of the exporter's /metrics and /healthz."""
        return self.supervisor.service("exporter").address

    @property
    def trend_dir(self) -> Path:
        return (self.options.work_dir / "gpu-trend").resolve()

    def client_env(self, tenant: str = "") -> dict[str, str]:
        """What a `swapline` client needs to reach this stack: as `tenant` (default: the first) when secure."""
        env = {GATEWAY_ENV: self.gateway_address}
        if self.credentials is not None:
            env[CA_FILE_ENV] = str(self.credentials.ca_file)
            env[TOKEN_ENV] = self.credentials.token(tenant or self.credentials.first_tenant)
        return env

    def job_client(self, tenant: str = "", timeout_seconds: float = 60.0) -> JobClient:
        """A client of this stack's gateway; when secure it trusts the stack's CA and carries `tenant`'s token."""
        return JobClient.from_env(self.gateway_address, timeout_seconds, self.client_env(tenant))

    def pid(self, name: str) -> int:
        """The current process id of a service or of tritonserver (TRITON_NAME)."""
        return self.supervisor.pid(name)

    def metrics_address(self, name: str) -> str:
        """host:port of a service's /metrics: per-method RPC counts, latencies and calls in flight."""
        return self.supervisor.metrics_address(name)

    def restarts(self) -> dict[str, int]:
        """How many times the supervisor has restarted each child, by name (tritonserver included)."""
        return self.supervisor.restarts()

    def wait_restarted(self, name: str, previous_pid: int, timeout: float) -> int:
        """Blocks until `name` runs as a process other than `previous_pid` and serves again; returns its pid."""
        return self.supervisor.wait_restarted(name, previous_pid, timeout)

    def _start_tier(self, envs: Mapping[str, Mapping[str, str]]) -> dict[str, ServiceProcess]:
        return self.supervisor.start(
            {
                name: {
                    **security_env(service_env_prefix(name), self.credentials, self.options.mutual_tls),
                    **env,
                    **self.options.extra_env,
                }
                for name, env in envs.items()
            }
        )

    def start(self) -> EmbeddedStack:
        options = self.options
        options.media_root.mkdir(parents=True, exist_ok=True)
        media_root = str(options.media_root.resolve())
        if options.secure:
            self.credentials = generate_credentials(options.work_dir, options.tenants)
        self.triton = EmbeddedTriton(
            options.model_repository,
            options.work_dir / "triton",
            log_path=self.log_dir / "triton.log",
            intra_op_threads=options.triton_intra_op_threads,
            device=options.triton_device,
            gpu_instances=options.triton_gpu_instances,
            cuda_wait=options.triton_cuda_wait,
            # Explicit model control: the built-in models and the sets marked default load with Triton; the
            # residency service loads the other imported ones as jobs name them, within the GPU memory budget.
            explicit_load=(*BUILT_IN_FACTORIES, *default_set_models(options.model_repository)),
        )
        try:
            triton_ready = self._starter.submit(self.triton.start)
            triton_url = self.triton.grpc_url
            # Workers and decoders round robin over the GPUs this stack sees, so each GPU takes its share of chunks;
            # sizes left None are the layout's defaults for those GPUs and cores.
            layout = self._layout = plan_gpu_layout(
                probe_cuda().device_count, available_cores(), options.workers, options.frame_service_replicas
            )
            replicas = layout.frame_service_replicas
            sockets = self._frame_sockets(replicas)
            frame_memory = self._frame_memory_env()
            frame_service_env = {
                "decoder": {"SWAPLINE_DECODER_MEDIA_ROOT": media_root, **frame_memory("SWAPLINE_DECODER_")},
                "encoder": {"SWAPLINE_ENCODER_MEDIA_ROOT": media_root, **frame_memory("SWAPLINE_ENCODER_")},
                # Triton runs on this machine: tensors go through shared memory, not gRPC.
                "detector": {
                    "SWAPLINE_DETECTOR_TRITON_URL": triton_url,
                    "SWAPLINE_DETECTOR_TRITON_SHARED_MEMORY": "true",
                },
            }
            first_tier = self._start_tier(
                {
                    **{
                        replica_name(service, replica): {
                            **_server_env(f"SWAPLINE_{service.upper()}_"),
                            **sockets[replica_name(service, replica)][0],
                            **env,
                            **(decoder_gpu_env(layout.frame_service_gpus[replica]) if service == "decoder" else {}),
                        }
                        for service, env in frame_service_env.items()
                        for replica in range(replicas)
                    },
                    "exporter": {
                        **_server_env("SWAPLINE_EXPORTER_"),
                        "SWAPLINE_EXPORTER_TREND_DIR": str(self.trend_dir),
                        "SWAPLINE_EXPORTER_REPLAY": "",
                        # One machine, no Kubernetes API to ask which pod a GPU process belongs to.
                        "SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION": "false",
                    },
                }
            )
            # The gateway and the advisor call each other, so the advisor's port is chosen first; so is the
            # gateway's internal port (the workers' chunk queue), which the workers are given.
            advisor_port, queue_port = free_ports(2)
            advisor_address = f"127.0.0.1:{advisor_port}"

            def targets_of(replica: int) -> dict[str, str]:
                names = {service: replica_name(service, replica) for service in FRAME_SERVICES}
                return {
                    f"{service.upper()}_TARGET": sockets[name][1] or first_tier[name].address
                    for service, name in names.items()
                }

            targets = targets_of(0)
            self._start_tier(
                {
                    "gateway": {
                        **_server_env("SWAPLINE_GATEWAY_", options.gateway_port),
                        "SWAPLINE_GATEWAY_INTERNAL_PORT": str(queue_port),
                        "SWAPLINE_GATEWAY_MEDIA_ROOT": media_root,
                        "SWAPLINE_GATEWAY_GPU_TREND_SOURCE": "trend_log",
                        "SWAPLINE_GATEWAY_TREND_DIR": str(self.trend_dir),
                        "SWAPLINE_GATEWAY_ADVISOR_TARGET": advisor_address,
                        **{f"SWAPLINE_GATEWAY_{key}": value for key, value in targets.items()},
                    }
                }
            )
            self._start_tier(
                {
                    "advisor": {
                        **_server_env("SWAPLINE_ADVISOR_", advisor_port),
                        "SWAPLINE_ADVISOR_GATEWAY_TARGET": self.gateway_address,
                    }
                }
            )
            # Triton loads models while the CPU services start; workers need it serving.
            triton_ready.result()
            self.supervisor.supervise_triton(self.triton)
            residency = self._start_tier(
                {
                    "residency": {
                        **_server_env("SWAPLINE_RESIDENCY_"),
                        "SWAPLINE_RESIDENCY_TRITON_URL": triton_url,
                        "SWAPLINE_RESIDENCY_MODEL_REPOSITORY": str(self.triton.work_dir / "model_repository"),
                        "SWAPLINE_RESIDENCY_MEMORY_BUDGET_BYTES": str(options.gpu_memory_budget_bytes),
                        "SWAPLINE_RESIDENCY_PINNED_MODELS": ",".join(self.triton.loaded_at_start()),
                    }
                }
            )["residency"]
            self._start_tier(
                {
                    f"worker-{index}": {
                        **_server_env("SWAPLINE_WORKER_"),
                        "SWAPLINE_WORKER_GATEWAY_TARGET": f"127.0.0.1:{queue_port}",
                        "SWAPLINE_WORKER_TRITON_URL": triton_url,
                        "SWAPLINE_WORKER_TRITON_SHARED_MEMORY": "true",
                        "SWAPLINE_WORKER_RESIDENCY_TARGET": residency.address,
                        "SWAPLINE_WORKER_WORKER_ID": f"embedded-worker-{index}",
                        "SWAPLINE_WORKER_BATCH_SIZE": str(options.worker_batch_size),
                        **frame_memory("SWAPLINE_WORKER_"),
                        **{f"SWAPLINE_WORKER_{key}": value for key, value in targets_of(index % replicas).items()},
                        **worker_gpu_env(layout.worker_gpus[index], os.environ),
                    }
                    for index in range(layout.workers)
                }
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _frame_sockets(self, replicas: int) -> dict[str, tuple[dict[str, str], str]]:
        if self.options.frame_transport == "unix":
            # mkdtemp makes it 0700: only this user can reach the sockets in it.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="swapline-"))
            self.supervisor.remove_if_killed(self._socket_dir)
        return frame_service_sockets(self._socket_dir, replicas)

    def _frame_memory_env(self) -> Callable[[str], dict[str, str]]:
        """The variables that give a service the stack's frame memory directory, by the service's prefix."""
        if not self.options.frame_memory:
            return lambda prefix: {}
        # tmpfs where the machine has one, so the frames never reach a disk; mkdtemp makes it 0700.
        shared_memory = Path("/dev/shm")
        parent = shared_memory if shared_memory.is_dir() and os.access(shared_memory, os.W_OK) else None
        directory = self._frame_memory_dir = Path(tempfile.mkdtemp(prefix="swapline-frames-", dir=parent))
        self.supervisor.remove_if_killed(directory)
        return lambda prefix: {f"{prefix}FRAME_MEMORY_DIR": str(directory)}

    def stop(self, timeout: float = 20.0) -> None:
        # Supervision ends before anything is stopped: no child is restarted during the stop.
        self.supervisor.stop(timeout)
        if self.triton is not None:
            self.triton.stop()
            self.triton = None
        for directory in (self._socket_dir, self._frame_memory_dir):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        self._socket_dir = self._frame_memory_dir = None

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

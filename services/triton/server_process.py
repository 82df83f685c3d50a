"""Runs the tritonserver binary that the nvidia-pytriton wheel ships, over the embedded repository.

The wheel's server needs three things it does not arrange itself: its bundled shared libraries on
LD_LIBRARY_PATH, a backend folder holding the Python backend plus the stub built for the running
Python version, and a PYTHONPATH on which the stub finds numpy, onnxruntime, torch and this repository.

The Python backend forks one stub process per model instance and gives each a /dev/shm region. A
tritonserver killed with SIGKILL leaves both behind (hundreds of MB), so the server runs as the leader
of its own process group, and its regions carry a prefix of this EmbeddedTriton's own: stopping it,
or finding it dead, ends the whole group and removes those regions.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services.common.cuda_waiting import CudaWait
from services.common.errors import FailedPrecondition, Unavailable
from services.common.settings_loader import env_name
from services.common.torch_catalog import TorchPrecision
from services.triton.device_choice import TritonDeviceChoice, resolve_device
from services.triton.embedded_repository import EMBEDDED_TORCH_PRECISION, TritonDevice, write_embedded_repository
from services.triton.served_precision import served_precision
from services.triton.settings import ENV_PREFIX

log = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
STUB_NAME = "triton_python_backend_stub"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
LOG_TAIL_CHARS = 4000
TRITON_ERROR_LINE = re.compile(r"^E\d{4} ")
READINESS_POLL_SECONDS = 0.25
STOP_TIMEOUT_SECONDS = 30.0
# The stub exchanges tensors with the server through shared memory; growing it in 16 MiB steps keeps
# a batch of 64 FP16 256x256 crops to two or three resizes instead of two dozen.
PYTHON_BACKEND_SHM_GROWTH_BYTES = 16 * 1024 * 1024
SHARED_MEMORY_DIR = Path("/dev/shm")
# How long the processes of a killed group get to disappear; a zombie waiting for its reaper counts as gone.
GROUP_EXIT_TIMEOUT_SECONDS = 10.0
GROUP_EXIT_POLL_SECONDS = 0.05
# What the stubs import from the environment, wherever it is installed (a user site, a distribution's
# dist-packages): the models import numpy and onnxruntime, or torch.
STUB_PACKAGES = ("numpy", "onnxruntime", "torch")
_server_numbers = itertools.count()

# Writes the repository tritonserver serves into the (empty) folder it is given, for the resolved
# device, and returns the models to wait for: how a caller serves models of its own (write_torch_model).
RepositoryWriter = Callable[[Path, TritonDevice], list[str]]


@dataclass(frozen=True)
class PytritonDistribution:
    server_binary: Path
    python_backend: Path
    python_stub: Path
    library_dir: Path


def locate_pytriton() -> PytritonDistribution:
    """The tritonserver pieces inside the installed nvidia-pytriton wheel, for this Python version."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition("nvidia-pytriton is not installed; run `make install` (it ships tritonserver)")
    package = Path(next(iter(spec.submodule_search_locations)))
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    distribution = PytritonDistribution(
        server_binary=package / "tritonserver" / "bin" / "tritonserver",
        python_backend=package / "tritonserver" / "backends" / "python",
        python_stub=package / "tritonserver" / "python_backend_stubs" / python_version / STUB_NAME,
        library_dir=package.parent / "nvidia_pytriton.libs",
    )
    for path in (distribution.server_binary, distribution.python_stub, distribution.library_dir):
        if not path.exists():
            raise FailedPrecondition(f"nvidia-pytriton at {package} lacks {path} (Python {python_version})")
    return distribution


def prepare_backend_directory(distribution: PytritonDistribution, work_dir: Path) -> Path:
    """`<work_dir>/backends/python/` with the backend library, its utils module and the stub."""
    backends = work_dir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        shutil.copy2(distribution.python_backend / name, python_dir / name)
    shutil.copy2(distribution.python_stub, python_dir / STUB_NAME)
    return backends


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: all probes stay bound until every port is chosen."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _prepend_path(value: str, existing: str | None) -> str:
    return value if not existing else f"{value}{os.pathsep}{existing}"


def package_parent(name: str) -> str | None:
    """The folder a top-level package is imported from, found without importing it; None when absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def server_environment(distribution: PytritonDistribution, base: dict[str, str]) -> dict[str, str]:
    environment = dict(base)
    environment["LD_LIBRARY_PATH"] = _prepend_path(str(distribution.library_dir), base.get("LD_LIBRARY_PATH"))
    # The stub's embedded interpreter finds its environment through the `python` first on PATH.
    environment["PATH"] = _prepend_path(str(Path(sys.exec_prefix) / "bin"), base.get("PATH"))
    packages = [parent for parent in map(package_parent, STUB_PACKAGES) if parent is not None]
    site_packages = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *packages])
    python_path = os.pathsep.join([str(REPOSITORY_ROOT), *site_packages])
    environment["PYTHONPATH"] = _prepend_path(python_path, base.get("PYTHONPATH"))
    return environment


def group_members(group_id: int) -> list[int]:
    """Pids of the live (not zombie) processes in a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while the list was read
        # The fields after the command name, which is in parentheses and may itself hold spaces.
        state, _parent, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == group_id and state != "Z":
            members.append(int(entry.name))
    return members


def end_process_group(group_id: int, timeout: float = GROUP_EXIT_TIMEOUT_SECONDS) -> list[int]:
    """SIGKILL to every process left in the group; returns the pids still alive after `timeout` (normally none)."""
    try:
        os.killpg(group_id, signal.SIGKILL)
    except ProcessLookupError:
        return []
    deadline = time.monotonic() + timeout
    while (left := group_members(group_id)) and time.monotonic() < deadline:
        time.sleep(GROUP_EXIT_POLL_SECONDS)
    return left


def log_summary(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The log's error lines (Triton prefixes them `E<mmdd>`), else its tail.

    A failed start ends in a wide status table; the cause sits in the error lines above it.
    """
    if not path.is_file():
        return "(no log written)"
    lines = path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if TRITON_ERROR_LINE.match(line) or line.startswith("error:")]
    return "\n".join(errors or lines)[-chars:]


class EmbeddedTriton:
    """tritonserver as a child process; `with EmbeddedTriton(...) as triton:` serves until the block ends.

    A supervisor polls `alive()` and calls `restart()` when it returns False: the server comes back on
    the same ports, so its clients reconnect to the URL they already have.
    """

    def __init__(
        self,
        model_repository: Path,
        work_dir: Path,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        log_path: Path | None = None,
        startup_timeout: float = 120,
        models: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        device: TritonDeviceChoice = "auto",
        repository_writer: RepositoryWriter | None = None,
        gpu_instances: int = 1,
        explicit_load: Sequence[str] | None = None,
        cuda_wait: CudaWait = "block",
    ) -> None:
        # The server runs with work_dir as its cwd, so relative paths would resolve twice.
        self.model_repository = model_repository.resolve()
        self.work_dir = work_dir.resolve()
        spare_ports = iter(free_ports(3))
        self.grpc_port = grpc_port or next(spare_ports)
        self.http_port = http_port or next(spare_ports)
        self.metrics_port = metrics_port or next(spare_ports)
        self.log_path = (log_path or self.work_dir / "tritonserver.log").resolve()
        self.startup_timeout = startup_timeout
        self.models: list[str] = list(models) if models is not None else []
        self._requested_models = models
        self.intra_op_threads = intra_op_threads
        self.device_choice = device
        # Stubs per built-in model on each GPU when the embedded twins are served on "cuda".
        self.gpu_instances = gpu_instances
        # How the GPU stubs wait for the GPU: they read it from their environment (cuda_wait_from_env).
        self.cuda_wait = cuda_wait
        # Resolved by the first start() and kept across restarts: "auto" asks a child process once.
        self.device: TritonDevice | None = None
        self.device_reason = ""
        self.repository_writer = repository_writer or self._write_embedded_twins
        # Set: Triton runs in explicit model-control mode and loads only these of the written models at
        # start; the residency service (services/residency) loads the others as jobs need them.
        self.explicit_load = None if explicit_load is None else tuple(explicit_load)
        # What the Python backend's /dev/shm regions are named after; unique to this object.
        self.shared_memory_prefix = f"swapline-triton-{os.getpid()}-{next(_server_numbers)}-"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def command(self, backends: Path, repository: Path) -> list[str]:
        distribution = locate_pytriton()
        return [
            str(distribution.server_binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_BACKEND_SHM_GROWTH_BYTES}",
            f"--backend-config=python,shm-region-prefix-name={self.shared_memory_prefix}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--grpc-address=127.0.0.1",
            "--http-address=127.0.0.1",
            "--exit-on-error=true",
            *self._model_control_flags(),
        ]

    def loaded_at_start(self) -> list[str]:
        """The written models Triton loads as it starts: all of them, or in explicit mode those named."""
        return [model for model in self.models if self.explicit_load is None or model in self.explicit_load]

    def _model_control_flags(self) -> list[str]:
        if self.explicit_load is None:
            return []
        return ["--model-control-mode=explicit", *(f"--load-model={model}" for model in self.loaded_at_start())]

    def _write_embedded_twins(self, out: Path, device: TritonDevice) -> list[str]:
        precision: TorchPrecision = EMBEDDED_TORCH_PRECISION
        if device == "cuda":
            decision = served_precision()
            log.info("models served in %s: %s", decision.precision.upper(), decision.reason)
            precision = decision.precision
        return write_embedded_repository(
            self.model_repository,
            out,
            self._requested_models,
            self.intra_op_threads,
            device,
            self.gpu_instances,
            precision,
        )

    def start(self) -> None:
        if self._process is not None:
            raise FailedPrecondition("this EmbeddedTriton is already started")
        distribution = locate_pytriton()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backend_directory(distribution, self.work_dir)
        repository = self.work_dir / "model_repository"
        if self.device is None:
            decision = resolve_device(self.device_choice)
            self.device, self.device_reason = decision.device, decision.reason
        shutil.rmtree(repository, ignore_errors=True)
        repository.mkdir(parents=True)
        self.models = self.repository_writer(repository, self.device)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                self.command(backends, repository),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={
                    **server_environment(distribution, dict(os.environ)),
                    env_name(ENV_PREFIX, "cuda_wait"): self.cuda_wait,
                },
                cwd=self.work_dir,
                # Its own process group, which its stubs join: the group ends with it (stop, alive).
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        client = triton_grpc.InferenceServerClient(self.grpc_url)
        try:
            while True:
                if self._is_ready(client):
                    return
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"tritonserver did not become ready in {self.startup_timeout:.0f} s; "
                        f"errors in {self.log_path}:\n{log_summary(self.log_path)}"
                    )
                try:
                    code = self._process.wait(timeout=READINESS_POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    continue
                raise Unavailable(
                    f"tritonserver exited with code {code} while starting; "
                    f"errors in {self.log_path}:\n{log_summary(self.log_path)}"
                )
        finally:
            client.close()

    def _is_ready(self, client: triton_grpc.InferenceServerClient) -> bool:
        try:
            loaded = self.loaded_at_start()
            return bool(client.is_server_ready()) and all(client.is_model_ready(model) for model in loaded)
        except InferenceServerException:
            return False

    def alive(self) -> bool:
        """Whether tritonserver is running. Finding it dead, this ends its stubs and removes its /dev/shm regions.

        False also before start() and after stop(); the server object is then ready for restart().
        """
        if self._process is None:
            return False
        if self._process.poll() is None:
            return True
        log.warning("tritonserver (pid %d) exited with code %s", self._process.pid, self._process.returncode)
        self.stop()
        return False

    def restart(self) -> None:
        """Stops the server if it runs, removes what it left, and starts it again on the same ports.

        Returns once every model is ready; raises Unavailable, as start() does, if it is not.
        """
        self.stop()
        self.start()

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if never started).

        Whatever is left of the server's process group (the stubs of a killed server) is then killed,
        and its /dev/shm regions removed.
        """
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # The server led the group, so the group's id is its pid.
        left = end_process_group(process.pid)
        if left:
            log.warning("processes %s of tritonserver's group did not end on SIGKILL", left)
        self._remove_shared_memory()
        return process.returncode

    def shared_memory_regions(self) -> list[Path]:
        """The /dev/shm regions of this server's Python backend."""
        return sorted(SHARED_MEMORY_DIR.glob(f"{self.shared_memory_prefix}*"))

    def _remove_shared_memory(self) -> None:
        for region in self.shared_memory_regions():
            region.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedTriton:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

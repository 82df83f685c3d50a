from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.cli import embedded_stack
from services.cli.embedded_stack import EmbeddedStack, StackOptions
from services.common.errors import FailedPrecondition
from services.common.settings_loader import SettingsError
from services.triton.device_choice import CudaProbe


def test_the_stack_takes_triton_gpu_instances_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SWAPLINE_TRITON_GPU_INSTANCES", raising=False)
    assert StackOptions(tmp_path, tmp_path / "media").triton_gpu_instances == 1
    monkeypatch.setenv("SWAPLINE_TRITON_GPU_INSTANCES", "4")
    assert StackOptions(tmp_path, tmp_path / "media").triton_gpu_instances == 4
    assert StackOptions(tmp_path, tmp_path / "media", triton_gpu_instances=2).triton_gpu_instances == 2
    monkeypatch.setenv("SWAPLINE_TRITON_GPU_INSTANCES", "0")
    with pytest.raises(SettingsError, match="SWAPLINE_TRITON_GPU_INSTANCES=0 must be at least 1"):
        StackOptions(tmp_path, tmp_path / "media")


class RecordingSupervisor:
    """Records each tier's environments instead of starting processes; every service "listens" at once."""

    def __init__(self) -> None:
        self.envs: dict[str, Mapping[str, str]] = {}
        self.removed_if_killed: list[Path] = []

    def remove_if_killed(self, directory: Path) -> None:
        self.removed_if_killed.append(directory)

    def start(self, envs: Mapping[str, Mapping[str, str]]) -> dict[str, SimpleNamespace]:
        self.envs.update(envs)
        return {name: self.service(name) for name in envs}

    def service(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(address=f"127.0.0.1:{1000 + len(self.envs)}")

    def supervise_triton(self, triton: object) -> None:
        pass

    def stop(self, timeout: float) -> None:
        pass


class _ServingTriton:
    def __init__(self, repository: Path, work_dir: Path, **_: object) -> None:
        self.work_dir = work_dir
        self.grpc_url = "127.0.0.1:8001"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def loaded_at_start(self) -> list[str]:
        return ["face_swapper"]


def simulate_machine(monkeypatch: pytest.MonkeyPatch, gpus: int, cores: int = 32) -> None:
    """The stack on a machine with `gpus` GPUs and `cores` cores, its Triton serving at once."""
    monkeypatch.setattr(embedded_stack, "EmbeddedTriton", _ServingTriton)
    monkeypatch.setattr(embedded_stack, "probe_cuda", lambda: CudaProbe(gpus > 0, "simulated", gpus))
    monkeypatch.setattr(embedded_stack, "available_cores", lambda: cores)


def _started(options: StackOptions) -> tuple[EmbeddedStack, dict[str, Mapping[str, str]]]:
    stack = EmbeddedStack(options)
    supervisor = RecordingSupervisor()
    stack.supervisor = supervisor  # type: ignore[assignment]
    stack.start()
    stack.stop()
    return stack, supervisor.envs


def _started_envs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int) -> dict[str, Mapping[str, str]]:
    simulate_machine(monkeypatch, gpus)
    options = StackOptions(tmp_path, tmp_path / "media", workers=5, frame_service_replicas=4, frame_transport="tcp")
    return _started(options)[1]


def _workers(envs: Mapping[str, Mapping[str, str]]) -> list[str]:
    return [name for name in envs if name.startswith("worker-")]


def _decoders(envs: Mapping[str, Mapping[str, str]]) -> list[str]:
    return [name for name in envs if name.startswith("decoder")]


def test_workers_and_decoders_of_the_stack_are_spread_over_its_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    envs = _started_envs(tmp_path, monkeypatch, gpus=2)
    assert [envs[f"worker-{index}"]["CUDA_VISIBLE_DEVICES"] for index in range(5)] == ["4", "6", "4", "6", "4"]
    decoders = ["decoder", "decoder-2", "decoder-3", "decoder-4"]
    assert [envs[name]["SWAPLINE_DECODER_GPU_ID"] for name in decoders] == ["0", "1", "0", "1"]
    assert not [name for name, env in envs.items() if "SWAPLINE_DECODER_GPU_ID" in env and name not in decoders]


def test_without_a_gpu_the_stack_names_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    envs = _started_envs(tmp_path, monkeypatch, gpus=0)
    assert len([name for name in envs if name.startswith("worker-")]) == 5
    assert not [name for name, env in envs.items() if {"CUDA_VISIBLE_DEVICES", "SWAPLINE_DECODER_GPU_ID"} & set(env)]


@pytest.mark.parametrize(
    ("gpus", "cores", "workers", "decoder_gpus"),
    [
        (2, 32, 16, ["0", "1", "0", "1"]),
        (1, 16, 8, ["0", "0"]),
        # Four cores: a worker per core, and one frame-service replica per GPU however few the cores.
        (2, 4, 4, ["0", "1"]),
    ],
)
def test_without_sizes_the_stack_is_sized_to_its_gpus_and_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int, cores: int, workers: int, decoder_gpus: list[str]
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    simulate_machine(monkeypatch, gpus, cores)

    stack, envs = _started(StackOptions(tmp_path, tmp_path / "media", frame_transport="tcp"))

    assert (stack.layout.workers, stack.layout.frame_service_replicas) == (workers, len(decoder_gpus))
    assert len(_workers(envs)) == workers
    assert [envs[name]["SWAPLINE_DECODER_GPU_ID"] for name in _decoders(envs)] == decoder_gpus
    assert len([name for name in envs if name.startswith("encoder")]) == len(decoder_gpus)
    worker_gpus = [envs[f"worker-{index}"]["CUDA_VISIBLE_DEVICES"] for index in range(workers)]
    assert worker_gpus == [str(index % gpus) for index in range(workers)]


def test_without_a_gpu_or_sizes_the_stack_keeps_two_workers_and_one_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulate_machine(monkeypatch, gpus=0, cores=64)

    stack, envs = _started(StackOptions(tmp_path, tmp_path / "media", frame_transport="tcp"))

    assert (stack.layout.workers, stack.layout.frame_service_replicas) == (2, 1)
    assert (len(_workers(envs)), _decoders(envs)) == (2, ["decoder"])


def test_a_size_given_is_kept_and_the_other_follows_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_machine(monkeypatch, gpus=2, cores=32)

    stack, envs = _started(StackOptions(tmp_path, tmp_path / "media", workers=6, frame_transport="tcp"))

    assert (stack.layout.workers, stack.layout.frame_service_replicas) == (6, 4)
    assert (len(_workers(envs)), len(_decoders(envs))) == (6, 4)


def test_the_layout_is_known_only_once_started(tmp_path: Path) -> None:
    stack = EmbeddedStack(StackOptions(tmp_path, tmp_path / "media"))
    with pytest.raises(FailedPrecondition, match="has not started"):
        _ = stack.layout


@pytest.mark.parametrize("frame_memory", [True, False])
def test_the_stacks_frame_memory_reaches_the_frame_services_and_workers_and_the_reaper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frame_memory: bool
) -> None:
    simulate_machine(monkeypatch, gpus=0)
    stack = EmbeddedStack(StackOptions(tmp_path, tmp_path / "media", workers=2, frame_memory=frame_memory))
    supervisor = RecordingSupervisor()
    stack.supervisor = supervisor  # type: ignore[assignment]
    stack.start()
    stack.stop()
    given = {
        name: value
        for name, env in supervisor.envs.items()
        for key, value in env.items()
        if key.endswith("FRAME_MEMORY_DIR")
    }
    if not frame_memory:
        assert given == {} and len(supervisor.removed_if_killed) == 1  # the sockets' directory alone
        return
    (directory,) = set(given.values())
    assert sorted(given) == ["decoder", "encoder", "worker-0", "worker-1"]
    assert Path(directory) in supervisor.removed_if_killed and len(supervisor.removed_if_killed) == 2
    assert not Path(directory).exists()  # removed at stop

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.cli import embedded_stack
from services.cli.embedded_stack import EmbeddedStack, StackOptions
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


class _RecordingSupervisor:
    """Records each tier's environments instead of starting processes; every service "listens" at once."""

    def __init__(self) -> None:
        self.envs: dict[str, Mapping[str, str]] = {}

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


def _started_envs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: int) -> dict[str, Mapping[str, str]]:
    monkeypatch.setattr(embedded_stack, "EmbeddedTriton", _ServingTriton)
    monkeypatch.setattr(embedded_stack, "probe_cuda", lambda: CudaProbe(gpus > 0, "simulated", gpus))
    monkeypatch.setattr(embedded_stack, "available_cores", lambda: 32)
    options = StackOptions(tmp_path, tmp_path / "media", workers=5, frame_service_replicas=4, frame_transport="tcp")
    stack = EmbeddedStack(options)
    supervisor = _RecordingSupervisor()
    stack.supervisor = supervisor  # type: ignore[assignment]
    stack.start()
    stack.stop()
    return supervisor.envs


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

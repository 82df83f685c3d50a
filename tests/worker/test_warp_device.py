"""Choosing where faces are warped: the device setting, its start-up resolution and the warper it gives."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition
from services.common.settings_loader import SettingsError, load_settings
from services.worker import settings as worker_settings
from services.worker.batch_warp import TorchFaceWarper
from services.worker.chunk_pipeline import HOST_WARPER
from services.worker.chunk_runner import face_warper_for
from services.worker.settings import SETTINGS_PREFIX, WorkerSettings, resolve_frame_format, resolve_warp_device

REQUIRED = {
    f"{SETTINGS_PREFIX}{name}": "127.0.0.1:1"
    for name in ("GATEWAY_TARGET", "DECODER_TARGET", "DETECTOR_TARGET", "ENCODER_TARGET", "TRITON_URL")
}


@pytest.fixture
def nvidia_driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    control = tmp_path / "nvidiactl"
    control.touch()
    monkeypatch.setattr(worker_settings, "NVIDIA_CONTROL_DEVICE", control)


def _torch_with_cuda(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: available))
    monkeypatch.setitem(sys.modules, "torch", fake)


def test_the_device_defaults_to_auto_and_refuses_unknown_values() -> None:
    assert load_settings(WorkerSettings, SETTINGS_PREFIX, REQUIRED).device == "auto"
    chosen = load_settings(WorkerSettings, SETTINGS_PREFIX, {**REQUIRED, f"{SETTINGS_PREFIX}DEVICE": "cuda"})
    assert chosen.device == "cuda"
    with pytest.raises(SettingsError, match="SWAPLINE_WORKER_DEVICE='gpu' is not one of auto, cpu, cuda"):
        load_settings(WorkerSettings, SETTINGS_PREFIX, {**REQUIRED, f"{SETTINGS_PREFIX}DEVICE": "gpu"})


@pytest.mark.usefixtures("nvidia_driver")
def test_auto_takes_cuda_where_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_with_cuda(monkeypatch, available=True)
    assert resolve_warp_device("auto") == "cuda"
    assert resolve_warp_device("cuda") == "cuda"
    assert resolve_warp_device("cpu") == "cpu"


@pytest.mark.usefixtures("nvidia_driver")
def test_auto_stays_on_the_host_where_torch_sees_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch_with_cuda(monkeypatch, available=False)
    assert resolve_warp_device("auto") == "cpu"
    with pytest.raises(FailedPrecondition, match="DEVICE=cuda, but torch sees no CUDA device"):
        resolve_warp_device("cuda")


@pytest.mark.usefixtures("nvidia_driver")
def test_auto_stays_on_the_host_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import torch` raise ImportError, as where torch is not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    assert resolve_warp_device("auto") == "cpu"
    with pytest.raises(FailedPrecondition, match="DEVICE=cuda, but torch is not installed"):
        resolve_warp_device("cuda")


def test_without_the_nvidia_driver_torch_is_not_even_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(worker_settings, "NVIDIA_CONTROL_DEVICE", tmp_path / "nvidiactl")
    _torch_with_cuda(monkeypatch, available=True)
    assert resolve_warp_device("auto") == "cpu"
    with pytest.raises(FailedPrecondition, match="there is no NVIDIA driver"):
        resolve_warp_device("cuda")


def test_the_host_gets_opencv_and_cuda_gets_the_torch_warper() -> None:
    assert face_warper_for("cpu") is HOST_WARPER
    on_gpu = face_warper_for("cuda")
    assert isinstance(on_gpu, TorchFaceWarper)
    assert on_gpu.device.type == "cuda"


def test_the_worker_starts_without_torch() -> None:
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import services.worker.__main__\n"
        "from services.worker.chunk_runner import face_warper_for\n"
        "from services.worker.settings import resolve_warp_device\n"
        "device = resolve_warp_device('auto')\n"
        "print(device, type(face_warper_for(device)).__name__, 'services.worker.batch_warp' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cpu", "Cv2FaceWarper", "False"]


def test_auto_frames_are_what_the_warper_asks_for_and_a_set_layout_wins() -> None:
    assert resolve_frame_format("auto", face_warper_for("cpu").pixel_format) == "nv12"
    assert resolve_frame_format("auto", "rgb24") == "rgb24"
    assert resolve_frame_format("rgb24", "nv12") == "rgb24"
    assert resolve_frame_format("nv12", "rgb24") == "nv12"


def test_the_frame_format_setting_takes_its_choices_only() -> None:
    assert load_settings(WorkerSettings, SETTINGS_PREFIX, REQUIRED).frame_format == "auto"
    with pytest.raises(SettingsError, match="SWAPLINE_WORKER_FRAME_FORMAT='yuv' is not one of auto, rgb24, nv12"):
        load_settings(WorkerSettings, SETTINGS_PREFIX, {**REQUIRED, f"{SETTINGS_PREFIX}FRAME_FORMAT": "yuv"})

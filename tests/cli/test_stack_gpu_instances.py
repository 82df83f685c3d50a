from pathlib import Path

import pytest

from services.cli.embedded_stack import StackOptions
from services.common.settings_loader import SettingsError


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

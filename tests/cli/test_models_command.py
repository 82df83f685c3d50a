"""The CLI and the embedded stack start without the model importer's ONNX tooling: the GPU machine's
carried packages (services/bench/gpu_carry.py) leave onnxconverter-common out, and only `models import`
needs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["services.cli.__main__", "services.cli.embedded_stack"])
def test_importing_the_cli_and_the_stack_loads_no_onnx_tooling(module: str) -> None:
    check = f"import sys, {module}; print(sorted(m for m in ('onnx', 'onnxconverter_common') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

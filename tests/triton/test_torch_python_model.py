"""torch_python_model.py in this process, with a stand-in for the `triton_python_backend_utils` that only
Triton's stub has; test_torch_serving runs it inside the real tritonserver."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from services.common.errors import FailedPrecondition
from services.triton.embedded_repository import TORCH_MODEL_SOURCE, torch_config
from services.triton.model_config import parse_model_config

STAND_INS = "tests.triton.torch_stand_ins"
STAND_IN_CONFIG = """
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP16 dims: [ 3, -1, -1 ] } ]
output [
  { name: "doubled" data_type: TYPE_FP16 dims: [ 3, -1, -1 ] },
  { name: "total" data_type: TYPE_FP32 dims: [ 1 ] }
]
"""
TRITON_DTYPES = {"TYPE_FP16": np.float16, "TYPE_FP32": np.float32}


@dataclass
class FakeTensor:
    name: str
    array: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.array


@dataclass
class FakeError:
    message: str


@dataclass
class FakeResponse:
    output_tensors: list[FakeTensor] = field(default_factory=list)
    error: FakeError | None = None


@dataclass
class FakeRequest:
    inputs: dict[str, np.ndarray]
    requested: list[str] = field(default_factory=list)

    def requested_output_names(self) -> list[str]:
        return self.requested


def _fake_backend_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor  # type: ignore[attr-defined]
    module.TritonError = FakeError  # type: ignore[attr-defined]
    module.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    module.triton_string_to_numpy = TRITON_DTYPES.__getitem__  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: FakeTensor(name, request.inputs[name])  # type: ignore[attr-defined]
    return module


@pytest.fixture()
def backend_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_backend_utils())
    spec = importlib.util.spec_from_file_location("torch_python_model_under_test", TORCH_MODEL_SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module


def _args(tmp_path: Path, name: str, factory: str, kind: str = "CPU") -> dict[str, str]:
    """What Triton hands initialize(): the config as JSON with the proto's field names."""
    config = torch_config(parse_model_config(STAND_IN_CONFIG), factory, "fp32", "cpu")
    config.name = name
    (tmp_path / name / "1").mkdir(parents=True, exist_ok=True)
    return {
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_name": name,
        "model_repository": str(tmp_path / name),
        "model_version": "1",
        "model_instance_kind": kind,
        "model_instance_device_id": "0",
    }


def _images(rng: np.random.Generator, batch: int, side: int) -> np.ndarray:
    return rng.uniform(0, 1, (batch, 3, side, side)).astype(np.float16)


def test_requests_of_each_shape_share_a_forward_pass_and_get_their_own_answers(
    backend_module: Any, tmp_path: Path
) -> None:
    model = backend_module.TritonPythonModel()
    model.initialize(_args(tmp_path, "doubler", f"{STAND_INS}:new_doubler"))
    rng = np.random.default_rng(41)
    requests = [
        FakeRequest({"image": _images(rng, 2, 4)}),
        FakeRequest({"image": _images(rng, 1, 6)}, ["total"]),
        FakeRequest({"image": _images(rng, 3, 4)}),
    ]

    responses = model.execute(requests)

    # Two shapes, two forward passes for three requests.
    assert model._model.module.calls == 2
    assert [[tensor.name for tensor in response.output_tensors] for response in responses] == [
        ["doubled", "total"],
        ["total"],
        ["doubled", "total"],
    ]
    for request, response in zip(requests, responses, strict=True):
        image = request.inputs["image"].astype(np.float32)
        answered = {tensor.name: tensor.array for tensor in response.output_tensors}
        assert response.error is None
        np.testing.assert_allclose(answered["total"][:, 0], 2 * image.sum(axis=(1, 2, 3)), rtol=1e-5)
        assert answered["total"].dtype == np.float32
        if "doubled" in answered:
            assert answered["doubled"].dtype == np.float16
            np.testing.assert_allclose(answered["doubled"], 2 * image, rtol=1e-3)


def test_a_malformed_answer_becomes_each_requests_error_naming_the_model(backend_module: Any, tmp_path: Path) -> None:
    model = backend_module.TritonPythonModel()
    model.initialize(_args(tmp_path, "short_model", f"{STAND_INS}:new_one_output_short"))
    rng = np.random.default_rng(42)

    responses = model.execute([FakeRequest({"image": _images(rng, 2, 4)}), FakeRequest({"image": _images(rng, 1, 4)})])

    for response in responses:
        assert response.output_tensors == []
        assert response.error is not None
        assert response.error.message.startswith("short_model: torch failed: model short_model returned 1 outputs")


def test_a_weights_link_whose_file_is_gone_fails_the_load(backend_module: Any, tmp_path: Path) -> None:
    args = _args(tmp_path, "doubler", f"{STAND_INS}:new_doubler")
    (tmp_path / "doubler" / "1" / "model.pt").symlink_to(tmp_path / "deleted.pt")
    with pytest.raises(FailedPrecondition, match=r"model\.pt for .*new_doubler do not exist"):
        backend_module.TritonPythonModel().initialize(args)


def test_a_config_without_a_factory_names_the_model(backend_module: Any, tmp_path: Path) -> None:
    args = _args(tmp_path, "doubler", f"{STAND_INS}:new_doubler")
    config = json.loads(args["model_config"])
    del config["parameters"]["torch_factory"]
    args["model_config"] = json.dumps(config)
    with pytest.raises(ValueError, match="model doubler: its config has no 'torch_factory' parameter"):
        backend_module.TritonPythonModel().initialize(args)


def test_a_gpu_instance_runs_on_the_gpu_triton_gave_it(backend_module: Any) -> None:
    assert backend_module.instance_device("GPU", "1") == torch.device("cuda:1")
    assert backend_module.instance_device("CPU", "0") == torch.device("cpu")
    assert backend_module.instance_device("MODEL", "0") == torch.device("cpu")

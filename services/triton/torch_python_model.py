"""Triton Python-backend model serving a torch module: the built-in models on a GPU, or any module.

embedded_repository copies this file to `<model>/1/model.py`; it runs inside Triton's stub process,
the only place `triton_python_backend_utils` exists, with the repository root on PYTHONPATH. The
config's parameters name the module (`torch_factory`, "python.module:function") and its precision
(`torch_precision`); `1/model.pt`, when present, holds its state dict. A GPU instance runs on the
GPU Triton gave it, a CPU instance on the CPU. Triton's dynamic batcher hands execute() several
requests at once; those of one shape become one forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from services.common.cuda_waiting import apply_cuda_wait
from services.common.torch_catalog import (
    FACTORY_PARAMETER,
    PRECISION_PARAMETER,
    TORCH_WEIGHTS_FILE,
    parse_torch_precision,
)
from services.common.torch_runtime import load_torch_model, prepare_torch_model, run_requests
from services.triton.onnx_session import group_by_shape
from services.triton.settings import cuda_wait_from_env

GPU_INSTANCE_KIND = "GPU"


def instance_device(kind: str, device_id: str) -> torch.device:
    """cuda:<id> for a GPU instance, the CPU for any other kind."""
    return torch.device(f"cuda:{int(device_id)}") if kind == GPU_INSTANCE_KIND else torch.device("cpu")


def string_parameter(config: dict[str, Any], name: str, model: str) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    if not value:
        raise ValueError(f"model {model}: its config has no {name!r} parameter")
    return str(value)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._model_name = args["model_name"]
        self._input_names = [tensor["name"] for tensor in config["input"]]
        output_dtypes = {
            tensor["name"]: np.dtype(pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        }
        factory = string_parameter(config, FACTORY_PARAMETER, self._model_name)
        precision = parse_torch_precision(string_parameter(config, PRECISION_PARAMETER, self._model_name))
        weights = Path(args["model_repository"]) / args["model_version"] / TORCH_WEIGHTS_FILE
        # A link whose target is gone must fail the load, not serve the factory's untrained weights.
        module = load_torch_model(factory, weights if weights.is_symlink() or weights.exists() else None)
        device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        if device.type == "cuda":
            # Before torch makes the CUDA context, whose flags it sets.
            apply_cuda_wait(cuda_wait_from_env())
        self._model = prepare_torch_model(self._model_name, module, device, precision, self._input_names, output_dtypes)

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            inputs = [
                {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self._input_names}
                for request in requests
            ]
        except Exception as error:  # every failure must become the requests' error response
            return [self._error_response(error) for _ in requests]
        responses: list[Any] = [None] * len(requests)
        for group in group_by_shape(inputs):
            try:
                outputs = run_requests(self._model, [inputs[index] for index in group])
            except Exception as error:
                for index in group:
                    responses[index] = self._error_response(error)
                continue
            for index, output in zip(group, outputs, strict=True):
                requested = requests[index].requested_output_names() or list(output)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, output[name]) for name in requested]
                )
        return responses

    def _error_response(self, error: Exception) -> Any:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self._model_name}: torch failed: {error}"))

    def finalize(self) -> None:
        del self._model

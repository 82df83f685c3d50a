"""Triton Python-backend model serving the model.onnx in its version folder through onnxruntime.

embedded_repository copies this file to `<model>/1/model.py`; it runs inside Triton's stub process,
the only place `triton_python_backend_utils` exists, with the repository root on PYTHONPATH.
Triton's dynamic batcher hands execute() several requests at once; they become one session call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from services.triton.model_config import MODEL_FILE
from services.triton.onnx_session import (
    INTRA_OP_THREADS_PARAMETER,
    group_by_shape,
    intra_op_threads,
    open_onnx_session,
    run_batched,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._model_name = args["model_name"]
        self._input_names = [tensor["name"] for tensor in config["input"]]
        self._output_dtypes: dict[str, np.dtype] = {
            tensor["name"]: np.dtype(pb_utils.triton_string_to_numpy(tensor["data_type"]))
            for tensor in config["output"]
        }
        parameter = config.get("parameters", {}).get(INTRA_OP_THREADS_PARAMETER, {}).get("string_value")
        model_path = Path(args["model_repository"]) / args["model_version"] / MODEL_FILE
        self._session = open_onnx_session(model_path, intra_op_threads(parameter))

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self._input_names}
            for request in requests
        ]
        responses: list[Any] = [None] * len(requests)
        for group in group_by_shape(inputs):
            try:
                outputs = run_batched(self._session, [inputs[index] for index in group], list(self._output_dtypes))
            except Exception as error:  # every failure must become the requests' error response
                failure = pb_utils.TritonError(f"{self._model_name}: onnxruntime failed: {error}")
                for index in group:
                    responses[index] = pb_utils.InferenceResponse(error=failure)
                continue
            for index, output in zip(group, outputs, strict=True):
                requested = requests[index].requested_output_names() or list(self._output_dtypes)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[self._tensor(name, output[name]) for name in requested]
                )
        return responses

    def _tensor(self, name: str, array: np.ndarray) -> Any:
        # The config's dtype is the contract clients decode with, whatever the graph computed in.
        return pb_utils.Tensor(name, np.ascontiguousarray(array.astype(self._output_dtypes[name], copy=False)))

    def finalize(self) -> None:
        del self._session

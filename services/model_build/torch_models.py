"""The built-in models as torch modules, served without their ONNX files, and the in-process runner of them.

The GPU machine's onnxruntime has no CUDA, so on a GPU the embedded stack serves the built-in models
from their torch definitions here (with the state dicts `make models` writes beside each model.onnx);
tests/model_build/test_torch_models.py checks that both give the same answers. Running a module
(services/common/torch_runtime.py) is shared by Triton's Python backend and TorchModelRunner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tritonclient.grpc import model_config_pb2

from services.common.errors import InvalidArgument, NotFound
from services.common.torch_catalog import (
    BUILT_IN_FACTORIES,
    TorchPrecision,
)
from services.common.torch_runtime import TorchModel, load_torch_model, prepare_torch_model, run_requests
from services.model_build.mtcnn_nets import new_stage
from services.model_build.swapper_model import new_swapper
from services.triton.model_config import output_dtypes, read_model_config, require_torch_weights


def new_mtcnn_pnet() -> nn.Module:
    return new_stage("pnet")


def new_mtcnn_rnet() -> nn.Module:
    return new_stage("rnet")


def new_mtcnn_onet() -> nn.Module:
    return new_stage("onet")


def new_face_swapper() -> nn.Module:
    return new_swapper("fp32")


def torch_model_from_config(
    name: str,
    module: nn.Module,
    config: model_config_pb2.ModelConfig,
    device: torch.device,
    precision: TorchPrecision,
) -> TorchModel:
    """A TorchModel whose inputs and outputs are the config's, in the config's order."""
    if config.max_batch_size <= 0:
        raise InvalidArgument(f"model {name} has no batch dimension (max_batch_size {config.max_batch_size})")
    inputs = [tensor.name for tensor in config.input]
    return prepare_torch_model(name, module, device, precision, inputs, output_dtypes(config))


def load_built_in(repository: Path, name: str, device: torch.device, precision: TorchPrecision) -> TorchModel:
    """A built-in model from its torch definition and `<repository>/<name>/1/model.pt`, typed by its config."""
    factory = BUILT_IN_FACTORIES.get(name)
    if factory is None:
        raise NotFound(f"model {name} is not built in; the built-in models are {', '.join(BUILT_IN_FACTORIES)}")
    module = load_torch_model(factory, require_torch_weights(repository, name))
    return torch_model_from_config(name, module, read_model_config(repository, name), device, precision)


class TorchModelRunner:
    """The ModelRunner of in-process runs on torch (tests/gpu, the one-process GPU baseline): named
    TorchModels answering with the tensors and dtypes Triton does, as LocalModels does over onnxruntime."""

    def __init__(self, models: Mapping[str, TorchModel]) -> None:
        self._models = dict(models)

    @classmethod
    def built_in(
        cls,
        repository: Path,
        device: torch.device,
        precision: TorchPrecision,
        models: Sequence[str] | None = None,
    ) -> TorchModelRunner:
        """The built-in models (default: all) from `repository`'s configs and model.pt files."""
        names = list(models) if models is not None else list(BUILT_IN_FACTORIES)
        return cls({name: load_built_in(repository, name, device, precision) for name in names})

    def _run(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        served = self._models.get(model)
        if served is None:
            raise NotFound(f"model {model} is not loaded; this runner has {', '.join(sorted(self._models))}")
        unknown = [name for name in outputs if name not in served.output_dtypes]
        if unknown:
            raise InvalidArgument(f"model {model} has no outputs {unknown}; it has {sorted(served.output_dtypes)}")
        (answer,) = run_requests(served, [inputs])
        return {name: answer[name] for name in outputs}

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        # torch releases the GIL while it computes, so a worker thread keeps the event loop free.
        return await asyncio.to_thread(self._run, model, inputs, outputs)

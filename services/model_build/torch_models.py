"""The built-in models as torch modules, served without their ONNX files, and the one way to run them.

The GPU machine's onnxruntime has no CUDA, so on a GPU the embedded stack serves the built-in models
from their torch definitions here (with the state dicts `make models` writes beside each model.onnx);
tests/model_build/test_torch_models.py checks that both give the same answers. run_module and
run_requests are shared by Triton's Python backend (services/triton/torch_python_model.py) and the
in-process TorchModelRunner, so both take and give tensors named and typed by the model's config.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tritonclient.grpc import model_config_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.media_paths import temporary_path
from services.model_build.mtcnn_nets import new_stage
from services.model_build.swapper_model import new_swapper
from services.model_build.torch_catalog import (
    BUILT_IN_FACTORIES,
    TORCH_PRECISIONS,
    TorchPrecision,
    require_torch_weights,
)
from services.triton.model_config import output_dtypes, read_model_config

__all__ = [
    "BUILT_IN_FACTORIES",
    "TORCH_PRECISIONS",
    "TorchModel",
    "TorchModelRunner",
    "TorchPrecision",
    "load_built_in",
    "load_torch_model",
    "prepare_torch_model",
    "run_module",
    "run_requests",
    "save_state_dict",
    "torch_model_from_config",
    "use_precision",
]

_COMPUTE_DTYPES: dict[TorchPrecision, torch.dtype] = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "tf32": torch.float32,
}


def new_mtcnn_pnet() -> nn.Module:
    return new_stage("pnet")


def new_mtcnn_rnet() -> nn.Module:
    return new_stage("rnet")


def new_mtcnn_onet() -> nn.Module:
    return new_stage("onet")


def new_face_swapper() -> nn.Module:
    return new_swapper("fp32")


def load_torch_model(factory: str, weights: Path | None) -> nn.Module:
    """The FP32 module `factory` ("python.module:function") returns, with the state dict in `weights` if given."""
    module_name, separator, function_name = factory.partition(":")
    if not (separator and module_name and function_name):
        raise InvalidArgument(f"torch factory {factory!r} is not 'python.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise InvalidArgument(f"torch factory {factory!r} cannot be imported: {error}") from None
    module = function()
    if not isinstance(module, nn.Module):
        raise InvalidArgument(f"torch factory {factory!r} returned a {type(module).__name__}, not an nn.Module")
    if weights is not None:
        if not weights.is_file():
            raise FailedPrecondition(f"weights {weights} for {factory} do not exist")
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise InvalidArgument(f"weights {weights} do not fit {factory}: {error}") from None
    return module.eval()


def save_state_dict(module: nn.Module, path: Path) -> Path:
    """Writes the module's state dict to `path` through a temporary name, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        torch.save(module.state_dict(), temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def use_precision(precision: TorchPrecision) -> None:
    """TF32 on only for "tf32". The flags are the process's own: each Triton model instance is a process."""
    allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


@dataclass(frozen=True)
class TorchModel:
    """A module ready to serve: on its device, in its precision's dtype, in eval mode."""

    name: str
    module: nn.Module
    device: torch.device
    precision: TorchPrecision
    input_names: tuple[str, ...]
    # In the order the module returns its outputs; the dtypes are the config's, whatever torch computed in.
    output_dtypes: Mapping[str, np.dtype]


def prepare_torch_model(
    name: str,
    module: nn.Module,
    device: torch.device,
    precision: TorchPrecision,
    input_names: Sequence[str],
    output_dtypes: Mapping[str, np.dtype],
) -> TorchModel:
    if precision not in TORCH_PRECISIONS:
        raise InvalidArgument(f"torch precision {precision!r} is not one of {', '.join(TORCH_PRECISIONS)}")
    use_precision(precision)
    prepared = module.to(device=device, dtype=_COMPUTE_DTYPES[precision]).eval().requires_grad_(False)
    return TorchModel(name, prepared, device, precision, tuple(input_names), dict(output_dtypes))


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


@cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        raise InvalidArgument(f"data type {dtype} has no torch equivalent") from None


def _to_device(array: np.ndarray, device: torch.device, compute_dtype: torch.dtype) -> torch.Tensor:
    # torch.from_numpy shares the buffer and only warns that it cannot keep a read-only one unwritten: copy those.
    host = np.ascontiguousarray(array) if array.flags.writeable else np.array(array, order="C")
    tensor = torch.from_numpy(host).to(device)
    return tensor.to(compute_dtype) if tensor.is_floating_point() else tensor


def _batch_size(model: TorchModel, inputs: Mapping[str, np.ndarray]) -> int:
    """The first dimension every input shares; a request whose inputs disagree would pair wrong items."""
    sizes = {array.shape[0] if array.ndim else -1 for array in inputs.values()}
    if len(sizes) != 1 or -1 in sizes:
        shapes = ", ".join(f"{name} {array.shape}" for name, array in inputs.items())
        raise InvalidArgument(f"model {model.name} needs inputs of one batch size, was given {shapes}")
    return sizes.pop()


def _to_host(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous array of its own: on the CPU a tensor can be the module's buffer or the caller's input."""
    cast = tensor.to(_torch_dtype(dtype))
    if cast.device.type == "cpu":
        return cast.clone(memory_format=torch.contiguous_format).numpy()
    return cast.contiguous().cpu().numpy()


def _returned_tensors(model: TorchModel, returned: object, batch: int) -> list[torch.Tensor]:
    tensors = [returned] if isinstance(returned, torch.Tensor) else returned
    if not isinstance(tensors, tuple | list) or not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        raise FailedPrecondition(f"model {model.name} returned a {type(returned).__name__}, not tensors")
    names = list(model.output_dtypes)
    if len(tensors) != len(names):
        raise FailedPrecondition(
            f"model {model.name} returned {len(tensors)} outputs; its config declares {len(names)} ({', '.join(names)})"
        )
    for name, tensor in zip(names, tensors, strict=True):
        if tensor.ndim == 0 or tensor.shape[0] != batch:
            raise FailedPrecondition(
                f"model {model.name} returned {name!r} of shape {tuple(tensor.shape)} for a batch of {batch}"
            )
    return list(tensors)


def run_module(model: TorchModel, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """One forward pass over `inputs` (in model.input_names order, batch first), on the model's device.

    Floating inputs are cast to the precision's dtype, outputs to the config's dtypes before they
    leave the device; every output is C-contiguous, as Triton's Python backend needs.
    """
    if len(inputs) != len(model.input_names):
        raise InvalidArgument(
            f"model {model.name} takes {len(model.input_names)} inputs ({', '.join(model.input_names)}), "
            f"was given {len(inputs)}"
        )
    batch = _batch_size(model, dict(zip(model.input_names, inputs, strict=True)))
    compute_dtype = _COMPUTE_DTYPES[model.precision]
    with torch.inference_mode():
        tensors = [_to_device(array, model.device, compute_dtype) for array in inputs]
        returned = _returned_tensors(model, model.module(*tensors), batch)
        return {
            name: _to_host(tensor, dtype)
            for (name, dtype), tensor in zip(model.output_dtypes.items(), returned, strict=True)
        }


def run_requests(model: TorchModel, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """One forward pass for requests that differ only in batch size (onnx_session.group_by_shape groups
    them so); the outputs come back split per request."""
    sizes = []
    for inputs in requests:
        if set(inputs) != set(model.input_names):
            raise InvalidArgument(
                f"model {model.name} takes inputs {sorted(model.input_names)}, was given {sorted(inputs)}"
            )
        sizes.append(_batch_size(model, inputs))
    if len(requests) == 1:
        joined = [requests[0][name] for name in model.input_names]
    else:
        joined = [np.concatenate([inputs[name] for inputs in requests]) for name in model.input_names]
    outputs = run_module(model, joined)
    boundaries = np.cumsum(sizes)[:-1]
    parts = {name: np.split(array, boundaries) for name, array in outputs.items()}
    return [
        {name: np.ascontiguousarray(pieces[index]) for name, pieces in parts.items()} for index in range(len(requests))
    ]


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

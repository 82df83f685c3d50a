"""Running a torch module as a model: built from its factory and weights, at a precision, on a device,
with tensors named and typed by the model's config.

Shared by Triton's Python backend (services/triton/torch_python_model.py) and the in-process runner
(services/model_build/torch_models.TorchModelRunner), so both take and give the same tensors.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.media_paths import temporary_path
from services.common.torch_catalog import TORCH_PRECISIONS, TorchPrecision

_COMPUTE_DTYPES: dict[TorchPrecision, torch.dtype] = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "tf32": torch.float32,
}


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

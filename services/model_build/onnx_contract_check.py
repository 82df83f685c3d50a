"""Checks an ONNX file against its face model contract before anything is installed from it.

Every graph input (an initializer that old exporters also list as an input is a weight, not an input)
and every output is checked: count, name where the contract names one, element type, rank and each
fixed dimension. A file that does not fit is refused with InvalidArgument naming the file, the tensor,
what it is and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from services.common.errors import InvalidArgument
from services.model_build.face_model_contracts import (
    EMAP_SHAPE,
    ModelContract,
    TensorContract,
    TensorDtype,
)
from services.model_build.onnx_rewrite import graph_inputs

# The opset domains of ONNX's own operators.
DEFAULT_DOMAINS = ("", "ai.onnx")
BATCH_LABEL = "N"
ANY_SIZE_LABEL = "?"
# The element types an emap may be stored in: float32, or float16 in the fp16 release.
EMAP_DATA_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)

# One dimension of a file's tensor: its fixed size, its symbolic name, or None where it has neither.
FileDim = int | str | None


@dataclass(frozen=True)
class CheckedModel:
    """A file that fits its contract. `input_names` and `output_names` are the file's names for the
    contract's inputs and outputs, in the contract's order (outputs the contract ignores left out).
    `batch_fixed_at_one`: some batched input or output has the literal 1 as its batch dimension, so
    the graph must be rewritten before Triton can batch it (Triton requires a dynamic first dimension
    on every tensor of a batching model). `opset`: the ai.onnx opset; `input_dtype`: the element type
    of the first input."""

    path: Path
    contract: ModelContract
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_fixed_at_one: bool
    opset: int
    input_dtype: TensorDtype


@dataclass(frozen=True)
class _FileTensor:
    name: str
    dtype: str
    shape: tuple[FileDim, ...] | None


def check_model(path: Path, contract: ModelContract) -> CheckedModel:
    """Refuses `path` unless every input and output fits `contract`; weights stored outside the file
    are not read."""
    model = _load(path)
    inputs = [_file_tensor(value) for value in graph_inputs(model.graph)]
    outputs = [_file_tensor(value) for value in _outputs_with_types(model)]
    matched_inputs = _match(path, "input", inputs, contract.inputs, extra_allowed=False)
    matched_outputs = _match(path, "output", outputs, contract.outputs, extra_allowed=contract.extra_outputs_ignored)
    for kind, found_tensors, expected_tensors in (
        ("input", matched_inputs, contract.inputs),
        ("output", matched_outputs, contract.outputs),
    ):
        for position, (found, expected) in enumerate(zip(found_tensors, expected_tensors, strict=True)):
            _check_tensor(path, f"{kind} {position}", found, expected)
    if contract.source_kind == "emap_embedding":
        _check_emap(path, model)
    return CheckedModel(
        path=path,
        contract=contract,
        input_names=tuple(tensor.name for tensor in matched_inputs),
        output_names=tuple(tensor.name for tensor in matched_outputs),
        batch_fixed_at_one=any(
            expected.batch_axis and found.shape is not None and found.shape[0] == 1
            for found, expected in (
                *zip(matched_inputs, contract.inputs, strict=True),
                *zip(matched_outputs, contract.outputs, strict=True),
            )
        ),
        opset=_opset(path, model),
        # Checked above to be one of the contract's element types.
        input_dtype=cast(TensorDtype, matched_inputs[0].dtype),
    )


def last_initializer(model: onnx.ModelProto, base_dir: Path | None = None) -> np.ndarray:
    """The graph's last initializer as an array: inswapper's emap (FaceFusion's model_helper reads it the
    same way). Weights stored outside the model file are read from `base_dir`, the file's folder."""
    if not model.graph.initializer:
        raise InvalidArgument(f"model graph {model.graph.name!r} has no initializers")
    tensor = model.graph.initializer[-1]
    if onnx.external_data_helper.uses_external_data(tensor) and base_dir is None:
        raise InvalidArgument(f"initializer {tensor.name!r} is stored outside the model file; its folder is needed")
    return numpy_helper.to_array(tensor, base_dir=str(base_dir or ""))


def _load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(path, load_external_data=False)
    except DecodeError as error:
        raise InvalidArgument(f"{path.name}: not an ONNX model ({error})") from error
    # Protobuf reads an empty file, and some other bytes, as a message with nothing set.
    if not model.HasField("graph") or not model.graph.node:
        raise InvalidArgument(f"{path.name}: not an ONNX model (it holds no graph)")
    return model


def _outputs_with_types(model: onnx.ModelProto) -> Sequence[onnx.ValueInfoProto]:
    """The graph's outputs; where an exporter declared an output without its type or shape, ONNX's shape
    inference supplies them (it needs the initializers' dimensions only, not their data)."""
    outputs = model.graph.output
    if all(output.type.tensor_type.elem_type and output.type.tensor_type.HasField("shape") for output in outputs):
        return outputs
    return onnx.shape_inference.infer_shapes(model).graph.output


def _file_tensor(value: onnx.ValueInfoProto) -> _FileTensor:
    if not value.type.HasField("tensor_type"):
        return _FileTensor(value.name, f"not a tensor ({value.type.WhichOneof('value')})", None)
    tensor_type = value.type.tensor_type
    dtype = _dtype_name(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return _FileTensor(value.name, dtype, None)
    dims: list[FileDim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return _FileTensor(value.name, dtype, tuple(dims))


def _match(
    path: Path, kind: str, found: list[_FileTensor], expected: tuple[TensorContract, ...], extra_allowed: bool
) -> list[_FileTensor]:
    """The file's tensor for each expected one: by name where the contract names it, else by position."""
    if len(found) < len(expected) or (len(found) > len(expected) and not extra_allowed):
        names = ", ".join(f'"{tensor.name}"' for tensor in found) or "none"
        wanted = "; ".join(_describe_expected(tensor) for tensor in expected)
        at_least = "at least " if extra_allowed else ""
        raise InvalidArgument(
            f"{path.name}: has {len(found)} {kind}s ({names}); expected {at_least}{len(expected)}: {wanted}"
        )
    by_name = {tensor.name: tensor for tensor in found}
    matched = []
    for position, tensor in enumerate(expected):
        if tensor.name is None:
            matched.append(found[position])
        elif tensor.name in by_name:
            matched.append(by_name[tensor.name])
        else:
            names = ", ".join(f'"{other.name}"' for other in found)
            raise InvalidArgument(
                f'{path.name}: has no {kind} "{tensor.name}" (its {kind}s are {names}); '
                f"expected {_describe_expected(tensor)}"
            )
    return matched


def _check_tensor(path: Path, place: str, found: _FileTensor, expected: TensorContract) -> None:
    """`place` is "input 0", "output 3" and so on: a tensor the contract does not name is told by it."""
    if found.dtype in expected.dtypes and _shape_fits(found.shape, expected):
        return
    kind = place.split()[0]
    label = f'{kind} "{found.name}"' if expected.name is not None else f'{place} ("{found.name}")'
    batch = f" ({BATCH_LABEL}, the batch, 1 or dynamic)" if expected.batch_axis else ""
    raise InvalidArgument(
        f"{path.name}: {label} is {_describe_found(found)}; expected {_describe_expected(expected, with_name=False)}"
        f"{batch}"
    )


def _shape_fits(shape: tuple[FileDim, ...] | None, expected: TensorContract) -> bool:
    if shape is None or len(shape) != len(expected.shape):
        return False
    for axis, (dim, wanted) in enumerate(zip(shape, expected.shape, strict=True)):
        if not isinstance(dim, int):
            continue
        if axis == 0 and expected.batch_axis:
            if dim != 1:
                return False
        elif wanted is not None and dim != wanted:
            return False
    return True


def _check_emap(path: Path, model: onnx.ModelProto) -> None:
    """The source is projected by the graph's last initializer, which must be the (512, 512) emap; only
    its declared dimensions and type are read here."""
    initializers = model.graph.initializer
    if not initializers:
        raise InvalidArgument(f"{path.name}: has no initializers; expected the last to be the emap {EMAP_SHAPE}")
    emap = initializers[-1]
    if tuple(emap.dims) != EMAP_SHAPE or emap.data_type not in EMAP_DATA_TYPES:
        raise InvalidArgument(
            f'{path.name}: last initializer "{emap.name}" is {_format_dims(tuple(emap.dims))} '
            f"{_dtype_name(emap.data_type)}; expected the emap, {EMAP_SHAPE} float32 or float16"
        )


def _opset(path: Path, model: onnx.ModelProto) -> int:
    versions = [opset.version for opset in model.opset_import if opset.domain in DEFAULT_DOMAINS]
    if not versions:
        raise InvalidArgument(f"{path.name}: imports no ai.onnx opset")
    return max(versions)


def _dtype_name(elem_type: int) -> str:
    """numpy's name for an ONNX element type ("float32"), or ONNX's own where numpy has none."""
    if elem_type == onnx.TensorProto.UNDEFINED:
        return "of no declared type"
    onnx_name = onnx.TensorProto.DataType.Name(elem_type).lower()
    try:
        numpy_name = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx_name
    # numpy holds ONNX's strings as objects.
    return onnx_name if numpy_name == "object" else numpy_name


def _format_dims(dims: Sequence[FileDim]) -> str:
    labels = [ANY_SIZE_LABEL if dim is None else str(dim) for dim in dims]
    return f"({labels[0]},)" if len(labels) == 1 else f"({', '.join(labels)})"


def _describe_found(tensor: _FileTensor) -> str:
    shape = "of no declared shape" if tensor.shape is None else _format_dims(tensor.shape)
    return f"{shape} {tensor.dtype}"


def _describe_expected(tensor: TensorContract, with_name: bool = True) -> str:
    dims: list[FileDim] = [
        BATCH_LABEL if axis == 0 and tensor.batch_axis else dim for axis, dim in enumerate(tensor.shape)
    ]
    described = f"{_format_dims(dims)} {' or '.join(tensor.dtypes)}"
    return f'"{tensor.name}" {described}' if with_name and tensor.name is not None else described

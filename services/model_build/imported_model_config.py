"""Triton configs for an imported ONNX model: production's onnxruntime backend, TensorRT in the precision of
the build (FP16 for the served model, FP32 for its twin) with the built-in models' profile and warm-up
(services/triton/tensorrt_config.py), tensors read from the graph itself.

A graph whose every input and output leads with a symbolic batch dimension (after onnx_rewrite.batchable)
is served with dynamic batching; one that does not (SCRFD's and RetinaFace's per-stride outputs have no
batch dimension) is served a request at a time, with max_batch_size 0 and its whole shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.errors import InvalidArgument
from services.model_build.onnx_rewrite import graph_inputs
from services.triton.tensorrt_config import SideRange, TensorrtPrecision, with_tensorrt

# Faces (or frames) a request may carry; the swapper's built-in twin takes 64 as well.
IMPORTED_MAX_BATCH = 64
QUEUE_DELAY_MICROSECONDS = 2000

_TRITON_TYPES: dict[int, int] = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.FLOAT16: model_config_pb2.TYPE_FP16,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
    onnx.TensorProto.INT32: model_config_pb2.TYPE_INT32,
    onnx.TensorProto.UINT8: model_config_pb2.TYPE_UINT8,
}


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """The tensor's dimensions, -1 where the graph leaves one open."""
    return [dim.dim_value if dim.HasField("dim_value") else -1 for dim in value.type.tensor_type.shape.dim]


def _leads_with_batch(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return len(dims) > 0 and not dims[0].HasField("dim_value")


def is_batched(model: onnx.ModelProto) -> bool:
    return all(_leads_with_batch(value) for value in [*graph_inputs(model.graph), *model.graph.output])


def _tensors(values: Sequence[onnx.ValueInfoProto], batched: bool, name: str) -> list[tuple[str, int, list[int]]]:
    """(name, Triton data type, dims less the batch dimension where the model batches) of each tensor."""
    tensors = []
    for value in values:
        elem_type = value.type.tensor_type.elem_type
        if elem_type not in _TRITON_TYPES:
            raise InvalidArgument(
                f"model {name}: tensor {value.name!r} has ONNX type {onnx.TensorProto.DataType.Name(elem_type)}, "
                "which Triton's configs here do not map"
            )
        dims = _dims(value)
        tensors.append((value.name, _TRITON_TYPES[elem_type], dims[1:] if batched else dims))
    return tensors


def imported_config(
    name: str, model: onnx.ModelProto, precision: TensorrtPrecision, dynamic_side: int
) -> model_config_pb2.ModelConfig:
    """The production config serving `model` (already rewritten for batching where it can be) as `name`, its
    dynamic image sides at `dynamic_side` (the contract's input size, which the services always send) in the
    TensorRT profile and the warm-up request."""
    batched = is_batched(model)
    config = model_config_pb2.ModelConfig(name=name, backend="onnxruntime")
    config.max_batch_size = IMPORTED_MAX_BATCH if batched else 0
    for tensor_name, data_type, dims in _tensors(graph_inputs(model.graph), batched, name):
        config.input.add(name=tensor_name, data_type=data_type, dims=dims)
    for tensor_name, data_type, dims in _tensors(model.graph.output, batched, name):
        config.output.add(name=tensor_name, data_type=data_type, dims=dims)
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_MICROSECONDS
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=1)
    return with_tensorrt(config, precision, SideRange.fixed(dynamic_side))


def config_text(config: model_config_pb2.ModelConfig, comment: str) -> str:
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + text_format.MessageToString(config)

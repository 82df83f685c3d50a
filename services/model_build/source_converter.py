"""The model that turns an ArcFace embedding into an embedding swapper's `source` input.

FaceFusion makes the source in Python (face_swapper/core.py, prepare_source_embedding): inswapper takes
the embedding projected by `emap`, the graph's last initializer (model_helper.get_static_model_initializer),
and divided by the embedding's length; hyperswap takes the unit-length embedding. swapline serves that
conversion as a small ONNX model beside the swapper (`<swapper>_source`), written at import, so that a
worker needs neither the swapper's file nor its weights: embedding (N, 512) in, source (N, 512) out.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.common.errors import InvalidArgument
from services.common.face_model_catalog import SourceKind
from services.model_build.face_model_contracts import EMAP_SHAPE, EMBEDDING_SIZE

CONVERTER_INPUT = "embedding"
CONVERTER_OUTPUT = "source"
CONVERTER_OPSET = 13
# onnxruntime 1.x reads IR version 8 and later; 8 is what opset 13 was released with.
CONVERTER_IR_VERSION = 8
EMAP_NAME = "emap"


def emap_of(swapper: onnx.ModelProto, file_name: str) -> np.ndarray:
    """inswapper's emap, its graph's last initializer, as float32 (an FP16 release stores it in FP16)."""
    if not swapper.graph.initializer:
        raise InvalidArgument(f"{file_name}: the graph has no initializers; inswapper's last one is its emap")
    emap = numpy_helper.to_array(swapper.graph.initializer[-1])
    if emap.shape != EMAP_SHAPE:
        raise InvalidArgument(
            f"{file_name}: the last initializer (emap) is {emap.shape} {emap.dtype}; expected {EMAP_SHAPE} float"
        )
    return emap.astype(np.float32)


def source_converter(kind: SourceKind, emap: np.ndarray | None = None) -> onnx.ModelProto:
    """embedding -> source for a swapper of this source kind; "emap_embedding" needs the swapper's emap."""
    nodes = [
        helper.make_node("ReduceL2", [CONVERTER_INPUT], ["length"], axes=[1], keepdims=1),
        helper.make_node("Div", [CONVERTER_INPUT, "length"], ["unit"]),
    ]
    initializers = []
    if kind == "emap_embedding":
        if emap is None:
            raise InvalidArgument("an emap_embedding swapper's converter needs its emap")
        initializers.append(numpy_helper.from_array(emap.astype(np.float32), EMAP_NAME))
        nodes.append(helper.make_node("MatMul", ["unit", EMAP_NAME], [CONVERTER_OUTPUT]))
    else:
        nodes.append(helper.make_node("Identity", ["unit"], [CONVERTER_OUTPUT]))
    graph = helper.make_graph(
        nodes,
        "source_converter",
        [helper.make_tensor_value_info(CONVERTER_INPUT, TensorProto.FLOAT, ["N", EMBEDDING_SIZE])],
        [helper.make_tensor_value_info(CONVERTER_OUTPUT, TensorProto.FLOAT, ["N", EMBEDDING_SIZE])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", CONVERTER_OPSET)])
    model.ir_version = CONVERTER_IR_VERSION
    onnx.checker.check_model(model)
    return model

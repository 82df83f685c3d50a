"""Graph rewrites an imported ONNX face model goes through before Triton serves it.

- `batchable`: a graph released at batch 1 (inswapper_128) rewritten so that Triton can batch it.
- `fp16_twin`: the FP16 build, computing in FP16 with inputs and outputs kept in their types.
- `fp32_twin`: the FP32 fallback of a model supplied only in FP16, its weights upcast so it computes in FP32.
- `verify_batch_equivalence`: runs a batched model against single runs of the original, in onnxruntime.

Each rewrite is pure: it copies the model, rewrites the copy and checks the result with onnx's checker and
strict shape inference. A graph that cannot be rewritten is refused with InvalidArgument naming the tensor
or node; the caller adds the file's name. Models must hold their weights inline (under 2 GB, as every
FaceFusion model does), since protobuf serialises nothing larger.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import Message
from onnx import (
    AttributeProto,
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    TypeProto,
    ValueInfoProto,
    helper,
    numpy_helper,
)
from onnxconverter_common import float16

from services.common.errors import InvalidArgument
from services.common.media_paths import write_file

Dimension = onnx.TensorShapeProto.Dimension

# The symbolic first dimension given to every input and output that was fixed at 1.
BATCH_DIM = "batch"
# The input types `verify_batch_equivalence` can make random samples of.
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
# Floating-point weights with more elements than this are copied without their values for shape inference:
# it reads the types and dimensions of weights, and the values only of small tensors (shapes, scales, pads).
INFERENCE_VALUE_LIMIT = 4096
# Ops whose `dtype` attribute names the type of what they create, so an FP16 one must create FP32 in the twin.
DTYPE_ATTRIBUTE_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Bernoulli")


def batchable(model: ModelProto) -> ModelProto:
    """A copy of `model` whose inputs and outputs carry a symbolic first dimension, with every Reshape
    that pins the batch to 1 through a constant shape rewritten to follow the batch instead.

    A model already dynamic (no input or output fixed at 1) comes back unchanged. Reshapes whose shape
    is computed at run time are left alone: if one of them still pins the batch, verification refuses
    the model and names the node where the batch was lost. Verification is structural (checker and
    shape inference); `verify_batch_equivalence` runs the two models to compare them."""
    rewritten = _copy(model)
    fixed = _fixed_at_one(rewritten.graph)
    if fixed:
        # Stale annotations would hold the old literal 1s, and not only in the first dimension (a
        # Transpose moves the batch), so they are dropped; shape inference recomputes them on demand.
        del rewritten.graph.value_info[:]
        at_batch_one = _shapes(_inferred(rewritten).graph)
        for value in fixed:
            first = value.type.tensor_type.shape.dim[0]
            first.Clear()
            first.dim_param = BATCH_DIM
        while _rewrite_reshapes(rewritten, at_batch_one):
            pass
    _verify_batchable(rewritten)
    return rewritten


def verify_batch_equivalence(
    original: ModelProto,
    batched: ModelProto,
    batch_size: int = 2,
    sample_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> None:
    """Runs `batched` on `batch_size` distinct random samples and `original` on each sample alone (CPU
    onnxruntime); InvalidArgument naming the output if the batch does not give the single runs' answers,
    which is what a Reshape that mixes samples would do. Every input must be floating-point; one with
    dimensions other than the batch left free (a detector's height and width) needs its sample's shape,
    without the batch, in `sample_shapes`."""
    rng = np.random.default_rng(seed)
    samples: dict[str, np.ndarray] = {}
    for value in graph_inputs(batched.graph):
        element_type = value.type.tensor_type.elem_type
        if element_type not in FLOAT_TYPES:
            raise InvalidArgument(f"input '{value.name}' is not floating-point; random samples cannot be made for it")
        declared = [dim.dim_value for dim in value.type.tensor_type.shape.dim[1:]]
        dims = list((sample_shapes or {}).get(value.name, declared))
        if not all(dims):
            raise InvalidArgument(
                f"input '{value.name}' has free dimensions besides the batch ({declared}, 0 = free); "
                "give its sample shape"
            )
        dtype = helper.tensor_dtype_to_np_dtype(element_type)
        samples[value.name] = rng.random((batch_size, *dims)).astype(dtype)
    single = _session(original)
    singles = [
        single.run(None, {name: array[index : index + 1] for name, array in samples.items()})
        for index in range(batch_size)
    ]
    together = _session(batched).run(None, samples)
    for position, output in enumerate(batched.graph.output):
        expected = np.concatenate([outputs[position] for outputs in singles])
        scale = max(float(np.abs(expected).max()), 1.0)
        if not np.allclose(together[position], expected, rtol=1e-4, atol=1e-4 * scale):
            worst = float(np.abs(together[position] - expected).max())
            raise InvalidArgument(
                f"output '{output.name}' at batch {batch_size} differs from {batch_size} single runs by up to "
                f"{worst:.3g}: the batch rewrite mixes samples"
            )


def fp16_twin(model: ModelProto) -> ModelProto:
    """The FP16 build of an FP32 model: weights and compute in FP16, inputs and outputs kept in their
    types by Casts at the edges. Ops FP16 would break (Resize, TopK, NonMaxSuppression, Range, ...:
    onnxconverter-common's default block list) stay in FP32 between Casts."""
    if is_fp16(model):
        raise InvalidArgument("the model's weights are already FP16: the file itself is its FP16 build")
    named = _copy(model)
    # The converter names each Cast after the node it feeds; unnamed nodes would give Casts equal names.
    _name_unnamed_nodes(named.graph)
    # The converter reads every tensor's type from value_info; inferred here on the weights' skeleton, it
    # costs no copy of the weights (the converter's own inference would copy them several times).
    del named.graph.value_info[:]
    named.graph.value_info.extend(onnx.shape_inference.infer_shapes(_skeleton(named)).graph.value_info)
    try:
        converted: ModelProto = float16.convert_float_to_float16(named, keep_io_types=True, disable_shape_infer=True)
    except ValueError as error:
        raise InvalidArgument(f"the model cannot be converted to FP16: {error}") from error
    _check(converted, "the FP16 build")
    return converted


def fp32_twin(model: ModelProto) -> ModelProto:
    """The FP32 twin of a model supplied only in FP16: every FP16 weight, constant, tensor type and Cast
    target becomes FP32, and Casts left converting FP32 to FP32 are removed, so the twin computes in FP32.
    Of a model without FP16 parts it only removes the Casts of tensors to their own type."""
    twin = _copy(model)
    _upcast_graph(twin.graph)
    _drop_noop_casts(twin)
    _check(twin, "the FP32 twin")
    return twin


def is_fp16(model: ModelProto) -> bool:
    """Whether most of the model's floating-point weights (initializers and Constant tensors) are FP16.
    Counted by elements, since an FP16 build keeps a few FP32 constants around the ops it leaves in FP32."""
    elements: dict[int, int] = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 0}
    for tensor in _weights(model.graph):
        if tensor.data_type in elements:
            elements[tensor.data_type] += math.prod(tensor.dims)
    return elements[TensorProto.FLOAT16] > elements[TensorProto.FLOAT]


def save_model(model: ModelProto, path: Path) -> Path:
    """Writes `model` under a temporary name beside `path` and renames it, so readers never see half a file."""
    return write_file(path, model.SerializeToString())


def _copy(model: ModelProto) -> ModelProto:
    copied = ModelProto()
    copied.CopyFrom(model)
    return copied


def _session(model: ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Errors only: onnxruntime warns about every unused initializer, and inswapper's emap is one by design.
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _check(model: ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise InvalidArgument(f"{what} does not pass onnx's checker: {error}") from error


def _skeleton(model: ModelProto) -> ModelProto:
    """A copy of `model` for shape inference: everything but the values of its large floating-point weights."""
    skeleton = ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(skeleton, field.name, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(skeleton.graph, field.name, value)
    for tensor in model.graph.initializer:
        stub = skeleton.graph.initializer.add()
        if tensor.data_type in FLOAT_TYPES and math.prod(tensor.dims) > INFERENCE_VALUE_LIMIT:
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
        else:
            stub.CopyFrom(tensor)
    return skeleton


def _copy_field(target: Message, name: str, value: object) -> None:
    if isinstance(value, Message):
        getattr(target, name).CopyFrom(value)
    elif isinstance(value, str | bytes | int | float):
        setattr(target, name, value)
    else:
        getattr(target, name).extend(value)


def _inferred(model: ModelProto) -> ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        raise InvalidArgument(f"shape inference fails on the graph made batchable: {error}") from error


def _fixed_at_one(graph: GraphProto) -> list[ValueInfoProto]:
    """The inputs and outputs fixed at batch 1; InvalidArgument for one whose first dimension is another literal."""
    weights = {initializer.name for initializer in graph.initializer}
    fixed = []
    for value in (*graph.input, *graph.output):
        # Before IR version 4 initializers were listed as inputs too; they are weights, not batched.
        if value.name in weights:
            continue
        # An output declared without a shape is left to shape inference, which verification reads.
        if not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise InvalidArgument(f"tensor '{value.name}' is a scalar, so it has no batch dimension")
        first = dims[0]
        if first.HasField("dim_value"):
            if first.dim_value != 1:
                raise InvalidArgument(
                    f"tensor '{value.name}' has first dimension {first.dim_value}; a batchable graph needs 1 "
                    "(fixed at batch 1) or a symbolic batch"
                )
            fixed.append(value)
    return fixed


def graph_inputs(graph: GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph's inputs less its initializers: older exporters list the weights as inputs too."""
    weights = {initializer.name for initializer in graph.initializer}
    return [value for value in graph.input if value.name not in weights]


def _batch_symbols(graph: GraphProto) -> set[str]:
    """The symbolic first dimensions of the graph's inputs: what a batched tensor's batch is called."""
    return {
        value.type.tensor_type.shape.dim[0].dim_param
        for value in graph.input
        if value.type.tensor_type.shape.dim and value.type.tensor_type.shape.dim[0].dim_param
    }


def _rewrite_reshapes(model: ModelProto, at_batch_one: dict[str, list[Dimension]]) -> bool:
    """One pass of the Reshape rule over the graph; True if it changed anything. Passes repeat because
    shape inference sees a Reshape's batch only once the Reshapes above it stop pinning it.
    `at_batch_one` holds every tensor's dimensions in the graph as it was released, fixed at batch 1."""
    graph = model.graph
    shapes = _shapes(_inferred(model).graph)
    constants = _constant_arrays(graph)
    batched = _batched_tensors(graph)
    symbols = _batch_symbols(graph)
    taken = _tensor_names(graph)
    replaced: set[str] = set()
    nodes: list[NodeProto] = []
    for node in graph.node:
        rewritten = NodeProto()
        rewritten.CopyFrom(node)
        if node.op_type == "Reshape" and node.input[1] in constants and node.input[0] in batched:
            data, shape_name = node.input
            shape = _batch_following_shape(
                node,
                constants[shape_name],
                shapes.get(data),
                at_batch_one.get(data),
                at_batch_one.get(node.output[0]),
                symbols,
            )
            if shape is not None:
                name = _unique(f"{shape_name}_{BATCH_DIM}", taken)
                nodes.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(shape)))
                replaced.add(shape_name)
                rewritten.input[1] = name
        nodes.append(rewritten)
    if not replaced:
        return False
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_unused(graph, replaced)
    return True


def _batch_following_shape(
    node: NodeProto,
    shape: np.ndarray,
    data_dims: list[Dimension] | None,
    data_at_one: list[Dimension] | None,
    output_at_one: list[Dimension] | None,
    symbols: set[str],
) -> np.ndarray | None:
    """The Reshape rule: the constant `shape` of a Reshape of batched data, with its leading literal 1
    replaced so that the batch passes through, or None to leave the node as it is.

    - The data's first dimension is the batch (shape inference says so): the 1 becomes 0, which Reshape
      (allowzero=0) reads as "copy the data's first dimension". That is exact whatever else the shape
      holds, a -1 included, and it keeps the batch visible to shape inference for the Reshapes below.
    - The data's first dimension is unknown (shape inference loses the batch's name through Resize, or
      through an earlier Reshape's -1) but was 1 at batch 1: the 1 becomes -1. The other entries are one
      sample's dimensions, so the -1 absorbs the batch from the element count. Two -1s would be
      ambiguous, so a -1 already elsewhere is first replaced by the value it had at batch 1.
    - The data's first dimension is a literal (the batch is not leading, or a Reshape above still pins
      it): left for a later pass, or for verification to refuse."""
    if shape.ndim != 1 or shape.size == 0 or shape[0] != 1 or not data_dims:
        return None
    first = data_dims[0]
    if first.HasField("dim_value"):
        return None
    following = shape.copy()
    allowzero = any(attribute.name == "allowzero" and attribute.i for attribute in node.attribute)
    if first.dim_param in symbols and not allowzero:
        following[0] = 0
        return following
    if not data_at_one or data_at_one[0].dim_value != 1:
        return None
    for index in np.flatnonzero(shape[1:] == -1) + 1:
        if not output_at_one or not output_at_one[index].HasField("dim_value"):
            return None
        following[index] = output_at_one[index].dim_value
    following[0] = -1
    return following


def _verify_batchable(model: ModelProto) -> None:
    _check(model, "the batch rewrite")
    inferred = _inferred(model)
    for output in inferred.graph.output:
        dims = output.type.tensor_type.shape.dim
        if not dims:
            raise InvalidArgument(f"output '{output.name}' has no batch dimension after the batch rewrite")
        first = dims[0]
        if first.HasField("dim_value"):
            where = _where_batch_is_lost(inferred.graph, output.name)
            raise InvalidArgument(
                f"output '{output.name}' keeps a fixed first dimension of {first.dim_value} after the batch "
                f"rewrite; {where}"
            )


def _where_batch_is_lost(graph: GraphProto, output: str) -> str:
    """Names the first node above `output` that takes batched data whose first dimension is not a
    literal and gives outputs whose first dimensions all are: where the batch got pinned."""
    shapes = _shapes(graph)
    batched = _batched_tensors(graph)
    ancestors = _ancestors(graph, output)
    for index, node in enumerate(graph.node):
        if index not in ancestors:
            continue
        takes_batch = any(name in batched and _free_first(shapes.get(name)) for name in node.input)
        if takes_batch and not any(_free_first(shapes.get(name)) for name in node.output):
            return f"the batch is lost at node '{node.name or node.output[0]}' ({node.op_type})"
    return "no node above it could be found to take the batch in and drop it"


def _ancestors(graph: GraphProto, output: str) -> set[int]:
    """The indices of the nodes `output` is computed from."""
    producers = {name: index for index, node in enumerate(graph.node) for name in node.output}
    found: set[int] = set()
    pending = [output]
    while pending:
        index = producers.get(pending.pop())
        if index is not None and index not in found:
            found.add(index)
            pending.extend(graph.node[index].input)
    return found


def _free_first(dims: list[Dimension] | None) -> bool:
    """Whether a tensor's first dimension may be the batch: unknown to shape inference, or symbolic."""
    return dims is None or len(dims) == 0 or not dims[0].HasField("dim_value")


def _shapes(graph: GraphProto) -> dict[str, list[Dimension]]:
    """Each tensor's dimensions, as declared or inferred."""
    return {
        value.name: list(value.type.tensor_type.shape.dim)
        for value in (*graph.input, *graph.value_info, *graph.output)
        if value.type.tensor_type.HasField("shape")
    }


def _constant_arrays(graph: GraphProto) -> dict[str, np.ndarray]:
    """The integer tensors the graph holds as constants (initializers and Constant nodes), by name."""
    arrays = {
        initializer.name: numpy_helper.to_array(initializer)
        for initializer in graph.initializer
        if initializer.data_type == TensorProto.INT64
    }
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type == TensorProto.INT64:
                arrays[node.output[0]] = numpy_helper.to_array(attribute.t)
            elif attribute.name == "value_ints":
                arrays[node.output[0]] = np.array(attribute.ints, dtype=np.int64)
    return arrays


def _batched_tensors(graph: GraphProto) -> set[str]:
    """The tensors computed from the graph's inputs; the rest (weights, constant branches) hold no batch."""
    batched = {value.name for value in graph_inputs(graph)}
    for node in graph.node:
        if any(name in batched for name in _reads(node)):
            batched.update(node.output)
    return batched


def _reads(node: NodeProto) -> Iterator[str]:
    """Every tensor name a node reads, its subgraphs' references to the outer graph included."""
    yield from node.input
    for graph in _subgraphs(node):
        for inner in graph.node:
            yield from _reads(inner)


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def _tensor_names(graph: GraphProto) -> set[str]:
    names = {value.name for value in (*graph.input, *graph.output, *graph.value_info)}
    names.update(initializer.name for initializer in graph.initializer)
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


def _unique(stem: str, taken: set[str]) -> str:
    name = stem
    suffix = 1
    while name in taken:
        suffix += 1
        name = f"{stem}_{suffix}"
    taken.add(name)
    return name


def _remove_unused(graph: GraphProto, names: set[str]) -> None:
    """Removes the initializers and Constant nodes among `names` that nothing reads any more."""
    read = {name for node in graph.node for name in _reads(node)} | {value.name for value in graph.output}
    unused = names - read
    # Deleted in place, last first: rebuilding the list would copy every weight.
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in unused:
            del graph.initializer[index]
    for index in reversed(range(len(graph.input))):
        if graph.input[index].name in unused:
            del graph.input[index]
    for index in reversed(range(len(graph.node))):
        if graph.node[index].op_type == "Constant" and graph.node[index].output[0] in unused:
            del graph.node[index]


def _name_unnamed_nodes(graph: GraphProto) -> None:
    taken = _tensor_names(graph)
    for node in graph.node:
        if not node.name:
            node.name = _unique(f"{node.op_type}_{node.output[0]}", taken)


def _weights(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value":
                yield attribute.t
        for subgraph in _subgraphs(node):
            yield from _weights(subgraph)


def _upcast_graph(graph: GraphProto) -> None:
    """Turns every FP16 weight, constant, tensor type and created type of `graph` and its subgraphs to FP32."""
    for initializer in graph.initializer:
        if initializer.data_type == TensorProto.FLOAT16:
            initializer.CopyFrom(_upcast_tensor(initializer))
    for value in (*graph.input, *graph.output, *graph.value_info):
        _upcast_type(value.type)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                attribute.t.CopyFrom(_upcast_tensor(attribute.t))
            for tensor in attribute.tensors:
                if tensor.data_type == TensorProto.FLOAT16:
                    tensor.CopyFrom(_upcast_tensor(tensor))
            creates_type = (node.op_type == "Cast" and attribute.name == "to") or (
                node.op_type in DTYPE_ATTRIBUTE_OPS and attribute.name == "dtype"
            )
            if creates_type and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
        for subgraph in _subgraphs(node):
            _upcast_graph(subgraph)


def _upcast_tensor(tensor: TensorProto) -> TensorProto:
    upcast = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
    upcast.doc_string = tensor.doc_string
    return upcast


def _upcast_type(type_proto: TypeProto) -> None:
    if type_proto.HasField("tensor_type") and type_proto.tensor_type.elem_type == TensorProto.FLOAT16:
        type_proto.tensor_type.elem_type = TensorProto.FLOAT
    elif type_proto.HasField("sequence_type"):
        _upcast_type(type_proto.sequence_type.elem_type)
    elif type_proto.HasField("optional_type"):
        _upcast_type(type_proto.optional_type.elem_type)
    elif type_proto.HasField("map_type"):
        _upcast_type(type_proto.map_type.value_type)


def _drop_noop_casts(model: ModelProto) -> None:
    """Removes the top-level Casts whose input already has their target type (the FP16 build's Casts
    at its edges and around its FP32 islands, once everything is FP32). A Cast that produces a graph
    output from another graph output, an input or a weight stays: removing it would rename one of those."""
    graph = model.graph
    types = _element_types(onnx.shape_inference.infer_shapes(_skeleton(model)).graph)
    outputs = {value.name for value in graph.output}
    produced = {name for node in graph.node for name in node.output}
    dropped: list[int] = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Cast" or types.get(node.input[0]) != _cast_target(node):
            continue
        source, target = node.input[0], node.output[0]
        if target not in outputs:
            _rename(graph, target, source)
        elif source in produced and source not in outputs:
            # The Cast's input takes the output's name instead, so the graph output keeps its name.
            _rename(graph, source, target)
        else:
            continue
        dropped.append(index)
    kept = [node for index, node in enumerate(graph.node) if index not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    live = {name for node in graph.node for name in node.output} | {value.name for value in graph.input}
    kept_value_info = [value for value in graph.value_info if value.name in live]
    del graph.value_info[:]
    graph.value_info.extend(kept_value_info)


def _cast_target(node: NodeProto) -> int:
    return next(attribute.i for attribute in node.attribute if attribute.name == "to")


def _rename(graph: GraphProto, old: str, new: str) -> None:
    """Renames tensor `old` to `new` wherever the graph's nodes (and their subgraphs) read or write it."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new
        for subgraph in _subgraphs(node):
            _rename(subgraph, old, new)


def _element_types(graph: GraphProto) -> dict[str, int]:
    values: list[ValueInfoProto] = [*graph.input, *graph.value_info, *graph.output]
    types = {value.name: value.type.tensor_type.elem_type for value in values if value.type.HasField("tensor_type")}
    types.update({initializer.name: initializer.data_type for initializer in graph.initializer})
    return types

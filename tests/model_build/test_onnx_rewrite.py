"""The import rewrites on tiny graphs built here: a batch-1 graph made batchable, its FP16 build, and the
FP32 twin of an FP16 model.

The fixture has inswapper's two inputs at a small size (target (1,3,8,8), source (1,16)) and pins the
batch to 1 in three Reshape shape constants, each of a kind the rewrite must handle differently."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper
from onnxconverter_common import float16
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from services.common.errors import InvalidArgument
from services.model_build.onnx_rewrite import (
    batchable,
    fp16_twin,
    fp32_twin,
    is_fp16,
    save_model,
    verify_batch_equivalence,
)

OPSET = 17


def _swapper(batch: int | str = 1, shapes: tuple[list[int], list[int], list[int]] | None = None) -> ModelProto:
    """target -> Conv -> Resize(1/2) -> Reshape to (1, 64) -> Gemm -> Reshape to (1, 4, 4), plus
    source * 0.5 -> Reshape to (1, 4, 4), added. The three Reshape shapes are [1, -1] (a Constant node),
    [1, 4, 4] and [1, 4, -1] (initializers) unless `shapes` gives others."""
    flat_shape, grid_shape, style_shape = shapes or ([1, -1], [1, 4, 4], [1, 4, -1])
    rng = np.random.default_rng(7)

    def weight(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array(rng.normal(0.0, 0.5, shape).astype(np.float32), name)

    def ints(name: str, values: list[int]) -> TensorProto:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [
        helper.make_node("Conv", ["target", "conv_w", "conv_b"], ["features"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Resize", ["features", "", "halve"], ["pooled"], mode="linear", name="pool"),
        helper.make_node("Constant", [], ["flat_shape"], value=ints("flat_shape", flat_shape), name="flat_shape"),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["mixed"], name="fc"),
        helper.make_node("Reshape", ["mixed", "grid_shape"], ["grid"], name="to_grid"),
        helper.make_node(
            "Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32)), name="half"
        ),
        helper.make_node("Mul", ["source", "half"], ["scaled"], name="scale_source"),
        helper.make_node("Reshape", ["scaled", "style_shape"], ["style"], name="to_style"),
        helper.make_node("Add", ["grid", "style"], ["output"], name="combine"),
    ]
    initializers = [
        weight("conv_w", 4, 3, 3, 3),
        weight("conv_b", 4),
        numpy_helper.from_array(np.array([1.0, 1.0, 0.5, 0.5], np.float32), "halve"),
        weight("fc_w", 64, 16),
        weight("fc_b", 16),
        ints("grid_shape", grid_shape),
        ints("style_shape", style_shape),
        # Like inswapper's emap: read by callers as the last initializer, unused by the graph.
        weight("emap", 16, 16),
    ]
    graph = helper.make_graph(
        nodes,
        "swapper",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [batch, 3, 8, 8]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [batch, 16]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 4, 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _feeds(batch: int, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "target": rng.random((batch, 3, 8, 8), dtype=np.float32),
        "source": rng.random((batch, 16), dtype=np.float32),
    }


def _run(model: ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    output: np.ndarray = session.run(["output"], feeds)[0]
    return output


def _single_runs(model: ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    batch = len(feeds["target"])
    return np.concatenate(
        [_run(model, {name: array[i : i + 1] for name, array in feeds.items()}) for i in range(batch)]
    )


def _reshape_shape(model: ModelProto, node_name: str) -> list[int]:
    node = next(node for node in model.graph.node if node.name == node_name)
    for initializer in model.graph.initializer:
        if initializer.name == node.input[1]:
            return [int(value) for value in numpy_helper.to_array(initializer)]
    constant = next(candidate for candidate in model.graph.node if candidate.output[0] == node.input[1])
    return [int(value) for value in numpy_helper.to_array(constant.attribute[0].t)]


def _first_dims(model: ModelProto) -> list[str | int]:
    return [
        value.type.tensor_type.shape.dim[0].dim_param or value.type.tensor_type.shape.dim[0].dim_value
        for value in (*model.graph.input, *model.graph.output)
    ]


def _float16_places(model: ModelProto) -> Iterator[str]:
    """Every place in the graph that still holds or makes FP16."""
    graph = model.graph
    yield from (tensor.name for tensor in graph.initializer if tensor.data_type == TensorProto.FLOAT16)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            yield value.name
    for node in graph.node:
        for attribute in node.attribute:
            casts_to_fp16 = attribute.name == "to" and attribute.i == TensorProto.FLOAT16
            if attribute.t.data_type == TensorProto.FLOAT16 or casts_to_fp16:
                yield node.name


def _weights_rounded_to_fp16(model: ModelProto) -> ModelProto:
    """The FP32 model with every FP32 weight and constant rounded through FP16: what an FP32 twin of its
    FP16 build must compute, to FP32 accuracy."""
    rounded = ModelProto()
    rounded.CopyFrom(model)
    for tensor in rounded.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float16).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return rounded


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_of_distinct_inputs_equals_single_runs_of_the_original(batch: int) -> None:
    feeds = _feeds(batch)
    np.testing.assert_allclose(
        _run(batchable(_swapper()), feeds), _single_runs(_swapper(), feeds), rtol=1e-5, atol=1e-5
    )


def test_the_original_refuses_a_batch_of_three() -> None:
    with pytest.raises(OrtInvalidArgument, match="dimensions"):
        _run(_swapper(), _feeds(3))


def test_symbolic_inputs_and_outputs_alone_still_fail_at_batch_three() -> None:
    # The [1, -1] flatten folds the three samples into one row of 3 x 64 that the Gemm cannot take.
    with pytest.raises(OrtInvalidArgument, match="K: 192"):
        _run(_swapper(batch="batch"), _feeds(3))


def test_inputs_and_outputs_get_the_symbolic_batch() -> None:
    assert _first_dims(batchable(_swapper())) == ["batch", "batch", "batch"]


def test_a_leading_one_becomes_zero_when_the_data_leads_with_the_batch() -> None:
    assert _reshape_shape(batchable(_swapper()), "to_style") == [0, 4, -1]


def test_a_leading_one_becomes_minus_one_when_the_batch_is_hidden_and_no_other_minus_one() -> None:
    assert _reshape_shape(batchable(_swapper()), "to_grid") == [-1, 4, 4]


def test_an_other_minus_one_takes_its_batch_one_value_when_the_batch_is_hidden() -> None:
    assert _reshape_shape(batchable(_swapper()), "flatten") == [-1, 64]


def test_an_already_dynamic_model_comes_back_unchanged() -> None:
    dynamic = _swapper(batch="n", shapes=([0, -1], [-1, 4, 4], [0, 4, -1]))
    assert batchable(dynamic) == dynamic


def test_an_already_dynamic_model_gives_the_same_outputs() -> None:
    dynamic = _swapper(batch="n", shapes=([0, -1], [-1, 4, 4], [0, 4, -1]))
    np.testing.assert_array_equal(_run(batchable(dynamic), _feeds(3)), _run(dynamic, _feeds(3)))


def test_an_input_fixed_at_another_batch_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="'target' has first dimension 2"):
        batchable(_swapper(batch=2))


def test_a_reshape_computed_at_run_time_that_pins_the_batch_is_refused_naming_it() -> None:
    one = helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], np.int64)))
    rest = helper.make_node("Constant", [], ["rest"], value=numpy_helper.from_array(np.array([-1], np.int64)))
    nodes = [
        one,
        rest,
        helper.make_node("Concat", ["one", "rest"], ["shape"], axis=0, name="shape"),
        helper.make_node("Reshape", ["source", "shape"], ["output"], name="computed_flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "pinned",
        [helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16])],
    )
    with pytest.raises(InvalidArgument, match=r"'output' keeps a fixed first dimension.*'computed_flatten'"):
        batchable(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))


def _transposed_flatten(batch: int | str, shape: list[int]) -> ModelProto:
    """source (b, 16) -> Transpose -> (16, b) -> Reshape(shape): at batch 1 a copy, at batch n a mix of samples."""
    nodes = [
        helper.make_node("Transpose", ["source"], ["columns"], perm=[1, 0], name="transpose"),
        helper.make_node("Reshape", ["columns", "shape"], ["output"], name="rows"),
    ]
    graph = helper.make_graph(
        nodes,
        "transposed",
        [helper.make_tensor_value_info("source", TensorProto.FLOAT, [batch, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 16])],
        [numpy_helper.from_array(np.array(shape, np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_a_reshape_of_data_whose_batch_is_not_leading_is_refused_not_rewritten() -> None:
    with pytest.raises(InvalidArgument, match="'transpose'"):
        batchable(_transposed_flatten(1, [1, 16]))


def test_batch_equivalence_passes_for_the_rewrite() -> None:
    verify_batch_equivalence(_swapper(), batchable(_swapper()), batch_size=3)


def test_batch_equivalence_catches_a_rewrite_that_mixes_samples() -> None:
    with pytest.raises(InvalidArgument, match="'output' at batch 2"):
        verify_batch_equivalence(_transposed_flatten(1, [1, 16]), _transposed_flatten("b", [-1, 16]))


def test_fp16_build_keeps_float32_inputs_and_outputs() -> None:
    build = fp16_twin(batchable(_swapper()))
    types = [value.type.tensor_type.elem_type for value in (*build.graph.input, *build.graph.output)]
    assert types == [TensorProto.FLOAT] * 3


def test_fp16_build_is_close_to_fp32() -> None:
    reference = _run(_swapper(), _feeds(1))
    difference = np.abs(_run(fp16_twin(_swapper()), _feeds(1)) - reference).max()
    assert 0 < difference < 1e-2 * np.abs(reference).max()


def test_fp16_build_batches() -> None:
    feeds = _feeds(3)
    build = fp16_twin(batchable(_swapper()))
    np.testing.assert_allclose(_run(build, feeds), _single_runs(fp16_twin(_swapper()), feeds), rtol=1e-3, atol=1e-3)


def test_is_fp16_tells_the_builds_apart() -> None:
    build = fp16_twin(_swapper())
    assert [is_fp16(_swapper()), is_fp16(build), is_fp16(fp32_twin(build))] == [False, True, False]


def test_fp16_build_of_an_fp16_model_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="already FP16"):
        fp16_twin(fp16_twin(_swapper()))


def test_fp32_twin_holds_no_fp16() -> None:
    assert list(_float16_places(fp32_twin(fp16_twin(_swapper())))) == []


def test_fp32_twin_drops_the_casts_that_became_no_ops() -> None:
    assert [node.op_type for node in fp32_twin(fp16_twin(_swapper())).graph.node if node.op_type == "Cast"] == []


def test_fp32_twin_computes_in_fp32_on_the_fp16_weights() -> None:
    twin = fp32_twin(fp16_twin(_swapper()))
    expected = _run(_weights_rounded_to_fp16(_swapper()), _feeds(1))
    np.testing.assert_allclose(_run(twin, _feeds(1)), expected, rtol=1e-5, atol=1e-5)


def test_fp32_twin_of_a_model_with_fp16_inputs_and_outputs_takes_fp32() -> None:
    all_fp16 = float16.convert_float_to_float16(_swapper(), keep_io_types=False)
    twin = fp32_twin(all_fp16)
    assert all(
        value.type.tensor_type.elem_type == TensorProto.FLOAT for value in (*twin.graph.input, *twin.graph.output)
    )
    expected = _run(_weights_rounded_to_fp16(_swapper()), _feeds(1))
    np.testing.assert_allclose(_run(twin, _feeds(1)), expected, rtol=1e-5, atol=1e-5)


def test_every_rewrite_keeps_the_last_initializer_last() -> None:
    build = fp16_twin(_swapper())
    rewrites = (batchable(_swapper()), build, fp32_twin(build))
    assert [model.graph.initializer[-1].name for model in rewrites] == ["emap"] * 3


def test_save_model_writes_the_model_and_leaves_no_partial_file(tmp_path: Path) -> None:
    save_model(_swapper(), tmp_path / "model.onnx")
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]
    assert onnx.load(tmp_path / "model.onnx") == _swapper()


def _free_sized_detector() -> ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["input"], ["scores"], name="sigmoid")],
        "detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, "height", "width"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3, "height", "width"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_batch_equivalence_asks_for_the_sample_shape_of_free_sized_inputs() -> None:
    with pytest.raises(InvalidArgument, match="'input' has free dimensions"):
        verify_batch_equivalence(_free_sized_detector(), _free_sized_detector())


def test_batch_equivalence_runs_free_sized_inputs_at_the_given_sample_shape() -> None:
    verify_batch_equivalence(_free_sized_detector(), _free_sized_detector(), sample_shapes={"input": (3, 8, 8)})

from __future__ import annotations

from collections.abc import Callable, MutableSequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.common.errors import InvalidArgument
from services.common.media_paths import write_file
from services.model_build.face_model_contracts import CONTRACTS, contract_for_file
from services.model_build.onnx_contract_check import check_model, last_initializer
from tests.model_build.standin_face_models import STANDIN_BUILDERS, inswapper_standin, write_standin

STEMS = sorted(STANDIN_BUILDERS)
# The stand-ins fixed at batch 1: inswapper as released, and the anchor-stride detectors, whose input
# is (1, 3, height, width) ahead of outputs without a batch axis.
FIXED_AT_ONE = {"inswapper_128", "inswapper_128_fp16", "scrfd_2.5g", "retinaface_10g"}
# A size the anchor-stride detectors take (any multiple of 32): 5x5 cells at stride 32.
DETECTOR_SIDE = 160


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("standins")
    return {stem: write_standin(stem, directory) for stem in STEMS}


def _rewritten(source: Path, directory: Path, edit: Callable[[onnx.GraphProto], None]) -> Path:
    """A copy of `source` under the same file name in `directory`, its graph changed by `edit`."""
    model = onnx.load(source)
    edit(model.graph)
    return write_file(directory / source.name, model.SerializeToString())


def _declare(values: MutableSequence[onnx.ValueInfoProto], name: str, elem_type: int, dims: list[int | str]) -> None:
    index = next(index for index, value in enumerate(values) if value.name == name)
    values[index].CopyFrom(helper.make_tensor_value_info(name, elem_type, dims))


def _refusal(path: Path) -> str:
    with pytest.raises(InvalidArgument) as refused:
        check_model(path, contract_for_file(path))
    return refused.value.message


def test_every_contract_has_a_standin() -> None:
    assert set(STANDIN_BUILDERS) == set(CONTRACTS)


@pytest.mark.parametrize("stem", STEMS)
def test_each_standin_passes_its_contract(stem: str, standins: dict[str, Path]) -> None:
    path = standins[stem]
    checked = check_model(path, contract_for_file(path))
    graph = onnx.load(path).graph
    assert checked.contract is CONTRACTS[stem] and checked.path == path
    assert checked.input_names == tuple(value.name for value in graph.input)
    assert checked.output_names == tuple(value.name for value in graph.output)
    assert checked.batch_fixed_at_one == (stem in FIXED_AT_ONE)
    assert (checked.opset, checked.input_dtype) == (17, "float32")


@pytest.mark.parametrize("stem", STEMS)
def test_each_standin_computes_the_shapes_it_declares(stem: str, standins: dict[str, Path]) -> None:
    session = ort.InferenceSession(str(standins[stem]), providers=["CPUExecutionProvider"])
    sizes = {"N": 1, "height": DETECTOR_SIDE, "width": DETECTOR_SIDE}
    rows = {f"rows_{stride}": (DETECTOR_SIDE // stride) ** 2 * 2 for stride in (8, 16, 32)}
    rng = np.random.default_rng(0)
    feeds = {
        value.name: rng.random([sizes.get(dim, dim) for dim in value.shape], dtype=np.float32)
        for value in session.get_inputs()
    }
    results = session.run(None, feeds)
    declared = [[{**sizes, **rows}.get(dim, dim) for dim in value.shape] for value in session.get_outputs()]
    assert [list(result.shape) for result in results] == declared
    assert all(result.dtype == np.float32 and np.isfinite(result).all() for result in results)


def test_contract_for_file_goes_by_facefusions_file_name() -> None:
    assert contract_for_file(Path("/models/scrfd_2.5g.onnx")) is CONTRACTS["scrfd_2.5g"]
    assert contract_for_file(Path("inswapper_128_fp16.onnx")).source_kind == "emap_embedding"


@pytest.mark.parametrize("name", ["simswap_256.onnx", "inswapper_128.pt", "inswapper_128"])
def test_an_unknown_file_name_is_refused_with_the_known_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        contract_for_file(Path("/models") / name)
    message = refused.value.message
    assert message.startswith(f"{name}: ") and "/models" not in message
    assert all(f"{stem}.onnx" in message for stem in STEMS)


def test_the_inswapper_standin_hard_codes_batch_1_and_ends_with_its_emap(standins: dict[str, Path]) -> None:
    for stem, weight_type in (("inswapper_128", np.float32), ("inswapper_128_fp16", np.float16)):
        graph = onnx.load(standins[stem]).graph
        constants = {initializer.name: numpy_helper.to_array(initializer) for initializer in graph.initializer}
        (reshape,) = (node for node in graph.node if node.op_type == "Reshape")
        assert constants[reshape.input[1]][0] == 1
        assert graph.initializer[-1].name == "emap"
        emap = last_initializer(onnx.load(standins[stem]))
        assert emap.shape == (512, 512) and emap.dtype == weight_type


def test_the_fp16_inswapper_is_the_fp32_one_in_half_precision_behind_float32_tensors(
    standins: dict[str, Path],
) -> None:
    fp16 = onnx.load(standins["inswapper_128_fp16"]).graph
    assert {initializer.data_type for initializer in fp16.initializer} == {TensorProto.FLOAT16, TensorProto.INT64}
    assert [node.op_type for node in fp16.node].count("Cast") == 3
    rng = np.random.default_rng(1)
    source = rng.normal(size=(1, 512)).astype(np.float32)
    feeds = {"target": rng.random((1, 3, 128, 128), dtype=np.float32), "source": source / np.linalg.norm(source)}
    outputs = [
        ort.InferenceSession(str(standins[stem]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for stem in ("inswapper_128", "inswapper_128_fp16")
    ]
    assert outputs[1].dtype == np.float32
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-2)
    assert outputs[0].std() > 0.05


def test_weights_kept_outside_the_file_are_not_needed_to_check_it(tmp_path: Path) -> None:
    model = onnx.load(inswapper_standin(tmp_path / "built" / "inswapper_128.onnx"))
    external = tmp_path / "external"
    external.mkdir()
    onnx.save_model(model, external / "inswapper_128.onnx", save_as_external_data=True, location="weights.bin")
    (external / "weights.bin").unlink()
    assert check_model(external / "inswapper_128.onnx", CONTRACTS["inswapper_128"]).batch_fixed_at_one


def test_last_initializer_reads_weights_kept_outside_the_file_from_its_folder(tmp_path: Path) -> None:
    model = onnx.load(inswapper_standin(tmp_path / "built" / "inswapper_128.onnx"))
    emap = numpy_helper.to_array(model.graph.initializer[-1])
    onnx.save_model(model, tmp_path / "inswapper_128.onnx", save_as_external_data=True, location="weights.bin")
    unloaded = onnx.load(tmp_path / "inswapper_128.onnx", load_external_data=False)
    np.testing.assert_array_equal(last_initializer(unloaded, tmp_path), emap)
    with pytest.raises(InvalidArgument, match="emap"):
        last_initializer(unloaded)


def test_initializers_listed_as_graph_inputs_are_weights_not_inputs(standins: dict[str, Path], tmp_path: Path) -> None:
    def list_weights_as_inputs(graph: onnx.GraphProto) -> None:
        graph.input.extend(
            helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims))
            for weight in graph.initializer
        )

    path = _rewritten(standins["inswapper_128"], tmp_path, list_weights_as_inputs)
    assert len(onnx.load(path).graph.input) == 7
    assert check_model(path, CONTRACTS["inswapper_128"]).input_names == ("target", "source")


def test_hyperswap_may_give_further_outputs_which_are_not_served(standins: dict[str, Path], tmp_path: Path) -> None:
    def add_mask(graph: onnx.GraphProto) -> None:
        graph.node.append(helper.make_node("ReduceMean", ["output", "channel_axis"], ["mask"], keepdims=1))
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "channel_axis"))
        graph.output.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, 256, 256]))

    path = _rewritten(standins["hyperswap_1b_256"], tmp_path, add_mask)
    assert check_model(path, CONTRACTS["hyperswap_1b_256"]).output_names == ("output",)


def test_an_output_declared_without_a_shape_is_checked_by_shape_inference(
    standins: dict[str, Path], tmp_path: Path
) -> None:
    def undeclare(graph: onnx.GraphProto) -> None:
        graph.output[0].CopyFrom(helper.make_empty_tensor_value_info("embedding"))

    path = _rewritten(standins["arcface_w600k_r50"], tmp_path, undeclare)
    assert check_model(path, CONTRACTS["arcface_w600k_r50"]).output_names == ("embedding",)


def test_a_wrong_input_size_is_refused(standins: dict[str, Path], tmp_path: Path) -> None:
    def shrink_source(graph: onnx.GraphProto) -> None:
        _declare(graph.input, "source", TensorProto.FLOAT, [1, 256])

    message = _refusal(_rewritten(standins["inswapper_128"], tmp_path, shrink_source))
    assert message == (
        'inswapper_128.onnx: input "source" is (1, 256) float32; expected (N, 512) float32 (N, the batch, 1 or dynamic)'
    )


def test_a_wrong_dtype_is_refused(standins: dict[str, Path], tmp_path: Path) -> None:
    def half_input(graph: onnx.GraphProto) -> None:
        _declare(graph.input, "input", TensorProto.FLOAT16, ["N", 3, 112, 112])

    message = _refusal(_rewritten(standins["arcface_w600k_r50"], tmp_path, half_input))
    assert message.startswith('arcface_w600k_r50.onnx: input "input" is (N, 3, 112, 112) float16; ')
    assert "expected (N, 3, 112, 112) float32" in message


def test_a_batch_fixed_above_1_is_refused(standins: dict[str, Path], tmp_path: Path) -> None:
    def batch_of_4(graph: onnx.GraphProto) -> None:
        _declare(graph.output, "embedding", TensorProto.FLOAT, [4, 512])

    message = _refusal(_rewritten(standins["arcface_w600k_r50"], tmp_path, batch_of_4))
    assert message == (
        'arcface_w600k_r50.onnx: output 0 ("embedding") is (4, 512) float32; '
        "expected (N, 512) float32 (N, the batch, 1 or dynamic)"
    )


def test_a_missing_output_is_refused(standins: dict[str, Path], tmp_path: Path) -> None:
    def drop_output(graph: onnx.GraphProto) -> None:
        del graph.output[0]

    message = _refusal(_rewritten(standins["yoloface_8n"], tmp_path, drop_output))
    assert message == "yoloface_8n.onnx: has 0 outputs (none); expected 1: (N, 20, 8400) float32"


def test_a_missing_named_output_is_refused_with_the_names_found(standins: dict[str, Path], tmp_path: Path) -> None:
    def rename_output(graph: onnx.GraphProto) -> None:
        graph.node[-1].output[0] = "result"
        graph.output[0].name = "result"

    message = _refusal(_rewritten(standins["inswapper_128"], tmp_path, rename_output))
    assert message == (
        'inswapper_128.onnx: has no output "output" (its outputs are "result"); '
        'expected "output" (N, 3, 128, 128) float32'
    )


def test_a_missing_detector_output_is_refused(standins: dict[str, Path], tmp_path: Path) -> None:
    def drop_landmarks(graph: onnx.GraphProto) -> None:
        del graph.output[8]

    message = _refusal(_rewritten(standins["retinaface_10g"], tmp_path, drop_landmarks))
    assert message.startswith('retinaface_10g.onnx: has 8 outputs ("score_8", ')
    assert message.endswith(
        "expected 9: (?, 1) float32; (?, 1) float32; (?, 1) float32; (?, 4) float32; "
        "(?, 4) float32; (?, 4) float32; (?, 10) float32; (?, 10) float32; (?, 10) float32"
    )


def test_an_unnamed_output_is_told_by_its_position(standins: dict[str, Path], tmp_path: Path) -> None:
    def widen_box(graph: onnx.GraphProto) -> None:
        _declare(graph.output, "bbox_16", TensorProto.FLOAT, ["rows_16", 5])

    message = _refusal(_rewritten(standins["scrfd_2.5g"], tmp_path, widen_box))
    assert message == 'scrfd_2.5g.onnx: output 4 ("bbox_16") is (rows_16, 5) float32; expected (?, 4) float32'


def test_a_batched_anchor_stride_export_is_refused(standins: dict[str, Path], tmp_path: Path) -> None:
    # insightface can export SCRFD with a batch axis on its outputs; FaceFusion reads 2-D rows only.
    def batch_scores(graph: onnx.GraphProto) -> None:
        _declare(graph.output, "score_8", TensorProto.FLOAT, [1, "rows_8", 1])

    message = _refusal(_rewritten(standins["scrfd_2.5g"], tmp_path, batch_scores))
    assert message == 'scrfd_2.5g.onnx: output 0 ("score_8") is (1, rows_8, 1) float32; expected (?, 1) float32'


def test_an_extra_input_or_output_is_refused(standins: dict[str, Path], tmp_path: Path) -> None:
    def add_input(graph: onnx.GraphProto) -> None:
        graph.input.append(helper.make_tensor_value_info("strength", TensorProto.FLOAT, [1]))

    message = _refusal(_rewritten(standins["inswapper_128"], tmp_path, add_input))
    assert message.startswith('inswapper_128.onnx: has 3 inputs ("target", "source", "strength"); expected 2: ')
    assert '"source" (N, 512) float32' in message

    def add_output(graph: onnx.GraphProto) -> None:
        graph.output.append(helper.make_tensor_value_info("styled", TensorProto.FLOAT, [1, 3, 128, 128]))

    message = _refusal(_rewritten(standins["inswapper_128"], tmp_path, add_output))
    assert message.startswith('inswapper_128.onnx: has 2 outputs ("output", "styled"); expected 1: "output" ')


def test_an_inswapper_whose_last_initializer_is_not_the_emap_is_refused(
    standins: dict[str, Path], tmp_path: Path
) -> None:
    def append_weight(graph: onnx.GraphProto) -> None:
        graph.initializer.append(numpy_helper.from_array(np.zeros((3,), dtype=np.float32), "late_bias"))

    message = _refusal(_rewritten(standins["inswapper_128"], tmp_path, append_weight))
    assert message == (
        'inswapper_128.onnx: last initializer "late_bias" is (3,) float32; '
        "expected the emap, (512, 512) float32 or float16"
    )


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4096), b"", b"not an onnx model"])
def test_a_file_that_is_not_onnx_is_refused_by_name(content: bytes, tmp_path: Path) -> None:
    path = write_file(tmp_path / "inswapper_128.onnx", content)
    message = _refusal(path)
    assert message.startswith("inswapper_128.onnx: not an ONNX model") and str(tmp_path) not in message

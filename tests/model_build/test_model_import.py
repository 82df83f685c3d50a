"""`swapline models import` on folders of stand-in files with FaceFusion's names, into a scratch repository."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2

from services.cli.__main__ import main
from services.common.errors import InvalidArgument
from services.model_build.model_import import import_model_set
from services.model_build.model_sets import default_set_models, installed_sets
from services.triton.model_config import read_model_config, repository_models
from tests.model_build.standin_face_models import inswapper_standin, write_standin

FP16 = onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def facefusion_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("assets-models")
    for stem in ("inswapper_128", "arcface_w600k_r50", "scrfd_2.5g"):
        write_standin(stem, folder)
    (folder / "gfpgan_1.4.onnx").write_bytes(b"a model swapline does not serve")
    (folder / "README.txt").write_text("not a model")
    return folder


def _repository(tmp_path: Path) -> Path:
    repository = tmp_path / "triton_models"
    (repository / "face_swapper").mkdir(parents=True)
    (repository / "face_swapper" / "config.pbtxt").write_text('name: "face_swapper"\n')
    return repository


def _snapshot(repository: Path) -> dict[str, bytes]:
    return {str(path.relative_to(repository)): path.read_bytes() for path in repository.rglob("*") if path.is_file()}


def _session(repository: Path, name: str) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def _weight_types(repository: Path, name: str) -> set[int]:
    return {weight.data_type for weight in onnx.load(str(repository / name / "1" / "model.onnx")).graph.initializer}


def test_a_folder_installs_as_a_set_with_fp16_builds_and_fp32_twins(facefusion_folder: Path, tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    result = import_model_set(facefusion_folder, repository, "facefusion")

    names = {entry.name: entry for entry in result.model_set.models}
    assert set(names) == {"inswapper_128", "arcface_w600k_r50", "scrfd_2.5g"}
    assert [entry.role for entry in result.model_set.models] == ["embedder", "swapper", "detector"]
    assert result.skipped == ("gfpgan_1.4.onnx: not a model swapline serves",)
    converters = ["inswapper_128_source"]
    expected = ["face_swapper", *names, *(f"{name}_fp32" for name in names), *converters]
    assert repository_models(repository) == sorted(expected)
    assert names["inswapper_128"].source_converter == "inswapper_128_source"
    assert installed_sets(repository) == [result.model_set]
    swapper = read_model_config(repository, "inswapper_128")
    assert swapper.backend == "onnxruntime" and swapper.max_batch_size == 64
    assert [(tensor.name, list(tensor.dims)) for tensor in swapper.input] == [
        ("target", [3, 128, 128]),
        ("source", [512]),
    ]
    assert swapper.input[0].data_type == model_config_pb2.TYPE_FP32
    accelerator = swapper.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert (accelerator.name, accelerator.parameters["precision_mode"]) == ("tensorrt", "FP16")
    twin = read_model_config(repository, "inswapper_128_fp32")
    assert twin.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP32"
    assert FP16 in _weight_types(repository, "inswapper_128")
    assert FP16 not in _weight_types(repository, "inswapper_128_fp32")
    # Warmed up with zeros as it loads: TensorRT's engines are built then, not on a job's first request.
    (warmup,) = swapper.model_warmup
    assert {name: (list(tensor.dims), tensor.zero_data) for name, tensor in warmup.inputs.items()} == {
        "target": ([3, 128, 128], True),
        "source": ([512], True),
    }
    # SCRFD's per-stride outputs have no batch axis: served a request at a time, with whole shapes.
    detector = read_model_config(repository, "scrfd_2.5g")
    assert detector.max_batch_size == 0 and len(detector.output) == 9
    # Its canvas is dynamic in the file: the warm-up request fills FaceFusion's 640.
    (canvas,) = detector.model_warmup[0].inputs.values()
    assert list(canvas.dims) == [1, 3, 640, 640]
    assert not any(path.name.startswith(".triton_models-import") for path in tmp_path.iterdir())


def test_inswappers_batch_one_graph_is_served_batched(facefusion_folder: Path, tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    (entry,) = [
        entry
        for entry in import_model_set(facefusion_folder, repository, "facefusion").model_set.models
        if entry.name == "inswapper_128"
    ]
    assert entry.batch_rewritten and entry.batched
    rng = np.random.default_rng(3)
    targets = rng.random((3, 3, 128, 128), dtype=np.float32)
    sources = rng.standard_normal((3, 512), dtype=np.float32)
    original = onnxruntime.InferenceSession(str(facefusion_folder / "inswapper_128.onnx"))
    singles = np.concatenate(
        [original.run(None, {"target": targets[i : i + 1], "source": sources[i : i + 1]})[0] for i in range(3)]
    )
    (batched,) = _session(repository, "inswapper_128_fp32").run(None, {"target": targets, "source": sources})
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-5)
    (half,) = _session(repository, "inswapper_128").run(None, {"target": targets, "source": sources})
    np.testing.assert_allclose(half, singles, atol=2e-2)


def test_an_fp16_only_file_is_served_as_its_model_with_an_upcast_twin(tmp_path: Path) -> None:
    folder = tmp_path / "fp16-only"
    inswapper_standin(folder / "inswapper_128_fp16.onnx", fp16=True)
    repository = _repository(tmp_path)
    (entry,) = import_model_set(folder, repository, "half").model_set.models
    assert (entry.name, entry.source_file, entry.twin) == (
        "inswapper_128",
        "inswapper_128_fp16.onnx",
        "inswapper_128_fp32",
    )
    assert FP16 not in _weight_types(repository, "inswapper_128_fp32")
    assert FP16 in _weight_types(repository, "inswapper_128")


def test_given_both_files_the_fp32_original_is_built_from(facefusion_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "both"
    shutil.copytree(facefusion_folder, folder)
    inswapper_standin(folder / "inswapper_128_fp16.onnx", fp16=True)
    result = import_model_set(folder, _repository(tmp_path), "both")
    assert "inswapper_128_fp16.onnx: inswapper_128.onnx is its FP32 original" in result.skipped
    assert [entry.source_file for entry in result.model_set.models if entry.role == "swapper"] == ["inswapper_128.onnx"]


def test_a_misshapen_model_is_refused_and_nothing_installed_changes(facefusion_folder: Path, tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    import_model_set(facefusion_folder, repository, "facefusion")
    before = _snapshot(repository)
    folder = tmp_path / "broken"
    shutil.copytree(facefusion_folder, folder)
    # A 256-wide source embedding: the file name says inswapper_128, its tensors do not.
    graph = onnx.load(str(folder / "inswapper_128.onnx"))
    graph.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 256
    onnx.save(graph, str(folder / "inswapper_128.onnx"))

    with pytest.raises(InvalidArgument, match=r'inswapper_128\.onnx: input "source" is \(1, 256\).*expected'):
        import_model_set(folder, repository, "broken")
    assert _snapshot(repository) == before
    assert [model_set.name for model_set in installed_sets(repository)] == ["facefusion"]
    assert not any(path.name.startswith(".triton_models-import") for path in tmp_path.iterdir())


def test_a_folder_without_any_known_model_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "gfpgan_1.4.onnx").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match=r"holds no model swapline serves; it takes .*inswapper_128"):
        import_model_set(folder, _repository(tmp_path), "other")


def test_the_cli_imports_and_lists(facefusion_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repository = _repository(tmp_path)
    assert main(["models", "import", str(facefusion_folder), "--set", "mine", "--repository", str(repository)]) == 0
    printed = capsys.readouterr().out
    assert "installed inswapper_128 (swapper, from inswapper_128.onnx; FP32 twin inswapper_128_fp32, batch 1" in printed
    assert "skipped gfpgan_1.4.onnx" in printed
    assert main(["models", "list", "--repository", str(repository)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == "builtin (built in): face_swapper, mtcnn_cascade"
    assert listed[1] == "mine: arcface_w600k_r50 (embedder), inswapper_128 (swapper), scrfd_2.5g (detector)"
    assert main(["models", "import", str(tmp_path / "missing"), "--repository", str(repository)]) != 0


def test_a_set_marked_default_loads_with_triton(facefusion_folder: Path, tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    import_model_set(facefusion_folder, repository, "on-demand")
    assert default_set_models(repository) == ()
    assert (
        main(
            ["models", "import", str(facefusion_folder), "--set", "mine", "--default", "--repository", str(repository)]
        )
        == 0
    )
    assert [(model_set.name, model_set.default) for model_set in installed_sets(repository)] == [
        ("mine", True),
        ("on-demand", False),
    ]
    assert sorted(default_set_models(repository)) == [
        "arcface_w600k_r50",
        "arcface_w600k_r50_fp32",
        "inswapper_128",
        "inswapper_128_fp32",
        "inswapper_128_source",
        "scrfd_2.5g",
        "scrfd_2.5g_fp32",
    ]


def test_an_embedding_swappers_source_is_made_by_the_model_served_beside_it(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    inswapper = write_standin("inswapper_128", folder)
    write_standin("hyperswap_1a_256", folder)
    repository = _repository(tmp_path)
    import_model_set(folder, repository, "swappers")
    # FaceFusion's prepare_source_embedding: the embedding times the graph's last initializer, over its length.
    emap = numpy_helper.to_array(onnx.load(str(inswapper)).graph.initializer[-1]).astype(np.float32)
    embeddings = np.random.default_rng(3).normal(size=(3, 512)).astype(np.float32) * 7.0
    lengths = np.linalg.norm(embeddings, axis=1, keepdims=True)
    (made,) = _session(repository, "inswapper_128_source").run(None, {"embedding": embeddings})
    np.testing.assert_allclose(made, embeddings @ emap / lengths, rtol=1e-4, atol=1e-5)
    (unit,) = _session(repository, "hyperswap_1a_256_source").run(None, {"embedding": embeddings})
    np.testing.assert_allclose(unit, embeddings / lengths, rtol=1e-5, atol=1e-6)

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.errors import FailedPrecondition
from services.triton.embedded_repository import embedded_config, servable_models, write_embedded_repository
from services.triton.model_config import read_model_config, repository_models

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
ALL_MODELS = ["face_swapper", "face_swapper_fp32", "mtcnn_onet", "mtcnn_pnet", "mtcnn_rnet"]
FP16 = model_config_pb2.TYPE_FP16


def _production_copy(tmp_path: Path, models: list[str], with_onnx: bool) -> Path:
    repository = tmp_path / "production"
    for model in models:
        (repository / model / "1").mkdir(parents=True)
        shutil.copy(PRODUCTION_REPOSITORY / model / "config.pbtxt", repository / model / "config.pbtxt")
        if with_onnx:
            (repository / model / "1" / "model.onnx").write_bytes(b"onnx bytes of " + model.encode())
    return repository


def test_production_repository_configures_the_onnx_models_and_the_torchscript_cascade() -> None:
    assert repository_models(PRODUCTION_REPOSITORY) == sorted([*ALL_MODELS, "mtcnn_cascade"])
    cascade = read_model_config(PRODUCTION_REPOSITORY, "mtcnn_cascade")
    assert cascade.platform == "pytorch_libtorch"
    assert cascade.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for model in ALL_MODELS:
        config = read_model_config(PRODUCTION_REPOSITORY, model)
        assert config.backend == "onnxruntime"
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [accelerator.name for accelerator in accelerators] == ["tensorrt"]
        expected = "FP32" if model.endswith("_fp32") else "FP16"
        assert accelerators[0].parameters["precision_mode"] == expected
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_on_the_cpu_the_stack_serves_the_onnx_models_and_leaves_the_cascade_out() -> None:
    assert servable_models(PRODUCTION_REPOSITORY, "cpu") == ALL_MODELS
    assert servable_models(PRODUCTION_REPOSITORY, "cuda") == sorted([*ALL_MODELS, "mtcnn_cascade"])


@pytest.mark.parametrize("model", ALL_MODELS)
def test_embedded_config_is_a_cpu_python_model_with_the_same_contract(model: str) -> None:
    production = read_model_config(PRODUCTION_REPOSITORY, model)
    derived = embedded_config(production)

    assert derived.backend == "python"
    assert not derived.HasField("optimization")
    assert [(group.kind, group.count) for group in derived.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert derived.name == production.name == model
    assert derived.max_batch_size == production.max_batch_size > 0
    assert list(derived.input) == list(production.input)
    assert list(derived.output) == list(production.output)
    assert derived.dynamic_batching.preferred_batch_size == production.dynamic_batching.preferred_batch_size
    assert derived.dynamic_batching.max_queue_delay_microseconds == 0
    assert production.dynamic_batching.max_queue_delay_microseconds > 0
    assert production.HasField("optimization"), "deriving must not modify the production config"
    # The warm-up is there for TensorRT's engines, which the twin has none of.
    assert production.model_warmup and not derived.model_warmup


def test_face_swapper_keeps_fp16_tensors() -> None:
    derived = embedded_config(read_model_config(PRODUCTION_REPOSITORY, "face_swapper"))
    assert {tensor.name: tensor.data_type for tensor in derived.input} == {"target": FP16, "source": FP16}
    assert {tensor.name: tensor.data_type for tensor in derived.output} == {"swapped": FP16, "mask": FP16}
    assert list(derived.output[1].dims) == [1, 256, 256]


def test_intra_op_threads_becomes_a_model_parameter() -> None:
    derived = embedded_config(read_model_config(PRODUCTION_REPOSITORY, "mtcnn_rnet"), intra_op_threads=3)
    assert derived.parameters["intra_op_threads"].string_value == "3"
    assert "intra_op_threads" not in embedded_config(read_model_config(PRODUCTION_REPOSITORY, "mtcnn_rnet")).parameters


def test_written_repository_holds_config_runner_and_model(tmp_path: Path) -> None:
    production = _production_copy(tmp_path, ALL_MODELS, with_onnx=True)
    out = tmp_path / "embedded"
    (out / "stale_model").mkdir(parents=True)

    written = write_embedded_repository(production, out)

    assert written == ALL_MODELS
    assert sorted(path.name for path in out.iterdir()) == ALL_MODELS
    runner_source = Path(__file__).resolve().parents[2] / "services/triton/onnx_python_model.py"
    for model in ALL_MODELS:
        config = text_format.Parse((out / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert (config.name, config.backend) == (model, "python")
        assert (out / model / "1" / "model.py").read_text() == runner_source.read_text()
        assert (out / model / "1" / "model.onnx").read_bytes() == b"onnx bytes of " + model.encode()


def test_chosen_models_only(tmp_path: Path) -> None:
    production = _production_copy(tmp_path, ALL_MODELS, with_onnx=True)
    out = tmp_path / "embedded"
    assert write_embedded_repository(production, out, ["mtcnn_rnet"]) == ["mtcnn_rnet"]
    assert [path.name for path in out.iterdir()] == ["mtcnn_rnet"]


def test_missing_onnx_names_the_model_and_the_fix(tmp_path: Path) -> None:
    production = _production_copy(tmp_path, ["mtcnn_onet"], with_onnx=False)
    with pytest.raises(FailedPrecondition, match=r"mtcnn_onet.*make models"):
        write_embedded_repository(production, tmp_path / "embedded")

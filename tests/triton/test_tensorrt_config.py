"""The production configs' TensorRT, built-in and imported: an explicit profile over the shapes the services
send (so engines are built as the model loads, once) and a warm-up at the profile's largest shape."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from services.common.errors import InvalidArgument
from services.detector.box_ops import PNET_CELL_SIZE, pyramid_scales
from services.detector.face_detector import (
    ONET_MAX_BATCH,
    ONET_SIDE,
    PNET_MAX_BATCH,
    RNET_MAX_BATCH,
    RNET_SIDE,
    DetectionDefaults,
)
from services.model_build.imported_model_config import IMPORTED_MAX_BATCH, imported_config
from services.triton.embedded_repository import PYTHON_MODEL_FILE, PYTHON_MODEL_SOURCE, TritonDevice, embedded_config
from services.triton.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_VERSION,
    read_model_config,
    repository_models,
    require_onnx,
)
from services.triton.server_process import EmbeddedTriton
from services.triton.tensorrt_config import (
    BUILT_IN_PLANS,
    PNET_SIDES,
    TRT_ENGINE_CACHE,
    built_in_with_tensorrt,
)
from services.worker.face_swapper import MAX_SWAP_BATCH
from services.worker.settings import WorkerSettings
from services.worker.stage_clients import detection_size

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
Shape = tuple[int, ...]
# The largest batch each service sends a model (the swapper's FP32 twin reruns a batch of the FP16 model's),
# and the fixed sides of the crops it sends; P-Net's sides are the pyramid's (below).
SERVICE_BATCHES = {
    "face_swapper": MAX_SWAP_BATCH,
    "face_swapper_fp32": MAX_SWAP_BATCH,
    "mtcnn_pnet": PNET_MAX_BATCH,
    "mtcnn_rnet": RNET_MAX_BATCH,
    "mtcnn_onet": ONET_MAX_BATCH,
}
CROP_SIDES = {"face_swapper": 256, "face_swapper_fp32": 256, "mtcnn_rnet": RNET_SIDE, "mtcnn_onet": ONET_SIDE}
# Frames the worker detects on, at camera sizes: landscape, portrait and square.
CAMERA_SIZES = [(1920, 1080), (1080, 1920), (1280, 720), (1080, 1080), (640, 480)]


def accelerator_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    return dict(accelerator.parameters)


def parse_shapes(option: str) -> dict[str, Shape]:
    """`target:1x3x256x256,source:1x512` -> {"target": (1, 3, 256, 256), "source": (1, 512)}."""
    shapes = {}
    for entry in option.split(","):
        name, dims = entry.split(":")
        shapes[name] = tuple(int(dim) for dim in dims.split("x"))
    return shapes


def profile(config: model_config_pb2.ModelConfig) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Each input's (min, opt, max) shapes as onnxruntime reads them from the config."""
    parameters = accelerator_parameters(config)
    smallest, typical, largest = (
        parse_shapes(parameters[f"trt_profile_{point}_shapes"]) for point in ("min", "opt", "max")
    )
    assert set(smallest) == set(typical) == set(largest)
    return {name: (smallest[name], typical[name], largest[name]) for name in smallest}


def built_in(model: str) -> model_config_pb2.ModelConfig:
    return read_model_config(PRODUCTION_REPOSITORY, model)


def test_every_built_in_onnx_model_has_a_tensorrt_plan() -> None:
    onnx_models = [
        model
        for model in repository_models(PRODUCTION_REPOSITORY)
        if read_model_config(PRODUCTION_REPOSITORY, model).backend == "onnxruntime"
    ]
    assert onnx_models == sorted(BUILT_IN_PLANS) == sorted(SERVICE_BATCHES)


@pytest.mark.parametrize("model", sorted(BUILT_IN_PLANS))
def test_the_checked_in_config_is_what_the_builder_makes(model: str) -> None:
    config = built_in(model)
    assert built_in_with_tensorrt(config) == config
    assert accelerator_parameters(config)["trt_engine_cache_path"] == TRT_ENGINE_CACHE


@pytest.mark.parametrize("model", sorted(BUILT_IN_PLANS))
def test_every_input_is_profiled_from_one_to_the_largest_batch_the_service_sends(model: str) -> None:
    config = built_in(model)
    shapes = profile(config)
    assert set(shapes) == {tensor.name for tensor in config.input}
    assert config.max_batch_size == SERVICE_BATCHES[model]
    for tensor in config.input:
        smallest, typical, largest = shapes[tensor.name]
        assert (smallest[0], largest[0]) == (1, SERVICE_BATCHES[model])
        assert smallest[0] <= typical[0] <= largest[0]
        for point in (smallest, typical, largest):
            assert len(point) == len(tensor.dims) + 1
            assert all(size == dim for size, dim in zip(point[1:], tensor.dims, strict=True) if dim > 0)
        if model in CROP_SIDES:
            side = CROP_SIDES[model]
            assert smallest[-2:] == typical[-2:] == largest[-2:] == (side, side)


@pytest.mark.parametrize("model", sorted(BUILT_IN_PLANS))
def test_the_warm_up_sends_zeros_of_every_input_at_the_largest_shape(model: str) -> None:
    config = built_in(model)
    shapes = profile(config)
    (warmup,) = config.model_warmup
    assert (warmup.batch_size, warmup.count) == (config.max_batch_size, 1)
    assert set(warmup.inputs) == {tensor.name for tensor in config.input}
    for tensor in config.input:
        sent = warmup.inputs[tensor.name]
        assert sent.data_type == tensor.data_type and sent.zero_data
        assert (warmup.batch_size, *sent.dims) == shapes[tensor.name][2]


def test_pnet_is_profiled_for_every_pyramid_level_of_the_workers_detection_copies() -> None:
    # The sizes P-Net's engine once had to be built for one by one, each on its first request.
    (field,) = [field for field in dataclasses.fields(WorkerSettings) if field.name == "detect_max_side"]
    detect_max_side = field.default
    assert isinstance(detect_max_side, int)
    smallest, typical, largest = profile(built_in("mtcnn_pnet"))["image"]
    levels = set()
    for width, height in CAMERA_SIZES:
        copy_width, copy_height = detection_size(width, height, detect_max_side)
        for min_face_size in range(PNET_CELL_SIZE, DetectionDefaults.min_face_size + 1):
            for scale in pyramid_scales(min(copy_width, copy_height), min_face_size, DetectionDefaults.scale_factor):
                levels.add((math.ceil(copy_height * scale), math.ceil(copy_width * scale)))
    assert len(levels) > 100
    for level in levels:
        assert all(low <= side <= high for low, side, high in zip(smallest[2:], level, largest[2:], strict=True))
    # TensorRT tunes for the first level of a full-width copy at the detector's default min_face_size.
    default_first = math.ceil(detect_max_side * PNET_CELL_SIZE / DetectionDefaults.min_face_size)
    assert typical[2:] == (default_first, default_first) == (PNET_SIDES.typical, PNET_SIDES.typical)


def _graph(inputs: list[onnx.ValueInfoProto], batch: str | int) -> onnx.ModelProto:
    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 3, "height", "width"])
    node = helper.make_node("Identity", [inputs[0].name], ["out"])
    return helper.make_model(helper.make_graph([node], "standin", inputs, [output]))


def test_an_imported_batched_model_is_profiled_and_warmed_at_its_largest_batch() -> None:
    model = _graph(
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, ["n", 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, ["n", 512]),
        ],
        "n",
    )
    config = imported_config("swapper", model, "fp16", 128)
    assert profile(config) == {
        "target": ((1, 3, 128, 128), (64, 3, 128, 128), (64, 3, 128, 128)),
        "source": ((1, 512), (64, 512), (64, 512)),
    }
    (warmup,) = config.model_warmup
    assert warmup.batch_size == IMPORTED_MAX_BATCH
    assert {name: list(tensor.dims) for name, tensor in warmup.inputs.items()} == {
        "target": [3, 128, 128],
        "source": [512],
    }


def test_an_imported_detector_is_profiled_at_its_canvas_a_request_at_a_time() -> None:
    # SCRFD's per-stride outputs have no batch axis: Triton serves it unbatched, its open canvas filled.
    model = _graph([helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])], 1)
    config = imported_config("scrfd", model, "fp16", 640)
    assert config.max_batch_size == 0
    assert profile(config) == {"input.1": ((1, 3, 640, 640),) * 3}
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1 and list(warmup.inputs["input.1"].dims) == [1, 3, 640, 640]


def test_an_input_name_the_profile_option_cannot_hold_is_refused() -> None:
    model = _graph([helper.make_tensor_value_info("images:0", TensorProto.FLOAT, ["n", 3, 64, 64])], "n")
    with pytest.raises(InvalidArgument, match="cannot name input 'images:0'"):
        imported_config("yolo", model, "fp16", 64)


def test_tritonserver_loads_a_model_with_the_production_warm_up(tmp_path: Path) -> None:
    # The real tritonserver checks the warm-up against the model's inputs and runs it while loading: R-Net's
    # CPU twin, which the embedded stack serves without it, here keeps production's warm-up of 1024 crops.
    production = built_in("mtcnn_rnet")
    (warm_up,) = production.model_warmup
    assert warm_up.batch_size == RNET_MAX_BATCH

    def write_rnet_with_its_warm_up(out: Path, device: TritonDevice) -> list[str]:
        config = embedded_config(production)
        config.model_warmup.extend(production.model_warmup)
        version = out / production.name / MODEL_VERSION
        version.mkdir(parents=True)
        (out / production.name / CONFIG_FILE).write_text(text_format.MessageToString(config))
        (version / PYTHON_MODEL_FILE).write_bytes(PYTHON_MODEL_SOURCE.read_bytes())
        (version / MODEL_FILE).symlink_to(require_onnx(PRODUCTION_REPOSITORY, production.name))
        return [production.name]

    with EmbeddedTriton(
        PRODUCTION_REPOSITORY, tmp_path, device="cpu", repository_writer=write_rnet_with_its_warm_up
    ) as triton:
        assert triton.models == ["mtcnn_rnet"]
        assert triton.alive()
    assert "successfully loaded 'mtcnn_rnet'" in triton.log_path.read_text()

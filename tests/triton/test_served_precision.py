"""FP32 from the start on a GPU without fast FP16: the catalogue's say, and the embedded repository it writes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.errors import InvalidArgument
from services.common.gpu_catalog import GpuCatalog, catalog_from_data
from services.common.torch_catalog import PRECISION_PARAMETER
from services.triton.embedded_repository import write_embedded_repository
from services.triton.served_precision import precision_for_gpus

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
SOURCES = {
    "memory": "datasheet",
    "fp16_tensor_tflops": "datasheet",
    "memory_bandwidth_gbps": "datasheet",
    "video_decoders": "support matrix",
    "price_per_hour_usd": "price list",
}


def entry(name: str, nvml_name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "nvml_names": [nvml_name],
        "memory_mib": 24000,
        "fp16_tensor_tflops": 10.0,
        "memory_bandwidth_gbps": 300,
        "video_decoders": 1,
        "price_per_hour_usd": 0.2,
        "source": dict(SOURCES, **extra.pop("extra_sources", {})),
        **extra,
    }


def catalog() -> GpuCatalog:
    slow = entry("P40 24GB", "Tesla P40", fast_fp16=False, extra_sources={"fast_fp16": "Pascal GP102: FP16 at 1/64"})
    return catalog_from_data({"gpus": [slow, entry("L4 24GB", "NVIDIA L4")]})


def test_a_gpu_the_catalogue_says_lacks_fast_fp16_is_served_fp32() -> None:
    decision = precision_for_gpus(["NVIDIA L4", "Tesla P40"], catalog())
    assert decision.precision == "fp32" and "Tesla P40" in decision.reason


def test_gpus_with_fast_fp16_are_served_fp16() -> None:
    assert precision_for_gpus(["NVIDIA L4"], catalog()).precision == "fp16"


def test_a_gpu_the_catalogue_lacks_is_taken_to_have_fast_fp16_and_the_reason_says_so() -> None:
    decision = precision_for_gpus(["NVIDIA B300"], catalog())
    assert decision.precision == "fp16" and "NVIDIA B300 not in the GPU catalogue" in decision.reason


def test_fast_fp16_must_be_a_boolean_with_a_source() -> None:
    with pytest.raises(InvalidArgument, match="fast_fp16"):
        catalog_from_data({"gpus": [entry("P40 24GB", "Tesla P40", fast_fp16="no")]})
    with pytest.raises(InvalidArgument, match=r"source\.fast_fp16"):
        catalog_from_data({"gpus": [entry("P40 24GB", "Tesla P40", fast_fp16=False)]})


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _imported_copy(tmp_path: Path) -> Path:
    """A repository holding an ONNX-only model and its FP32 twin, as `swapline models import` writes them."""
    repository = tmp_path / "production"
    for name in ("imported", "imported_fp32"):
        config = _config(PRODUCTION_REPOSITORY / "face_swapper" / "config.pbtxt")
        config.name = name
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(text_format.MessageToString(config))
        (repository / name / "1" / "model.onnx").write_bytes(f"onnx bytes of {name}".encode())
    return repository


@pytest.mark.parametrize(("precision", "served_file"), [("fp32", "imported_fp32"), ("fp16", "imported")])
def test_on_a_gpu_served_fp32_an_onnx_model_is_served_from_its_fp32_twin(
    tmp_path: Path, precision: str, served_file: str
) -> None:
    repository = _imported_copy(tmp_path)
    out = tmp_path / "embedded"
    write_embedded_repository(repository, out, ["imported"], device="cuda", precision=precision)  # type: ignore[arg-type]
    assert (out / "imported" / "1" / "model.onnx").read_bytes() == f"onnx bytes of {served_file}".encode()


def test_on_a_gpu_served_fp32_the_built_in_torch_models_run_in_fp32(tmp_path: Path) -> None:
    repository = tmp_path / "production"
    shutil.copytree(PRODUCTION_REPOSITORY / "face_swapper", repository / "face_swapper")
    out = tmp_path / "embedded"
    write_embedded_repository(repository, out, ["face_swapper"], device="cuda", precision="fp32")
    parameters = _config(out / "face_swapper" / "config.pbtxt").parameters
    assert parameters[PRECISION_PARAMETER].string_value == "fp32"

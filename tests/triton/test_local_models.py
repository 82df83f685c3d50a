from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.triton.local_models import LocalModels

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"


def test_rnet_answers_like_a_plain_session(local_models: LocalModels) -> None:
    image = np.random.default_rng(5).uniform(0, 255, (6, 3, 24, 24)).astype(np.float32)
    result = asyncio.run(local_models.infer("mtcnn_rnet", {"image": image}, ["probability", "regression"]))

    plain = ort.InferenceSession(str(PRODUCTION_REPOSITORY / "mtcnn_rnet/1/model.onnx"))
    probability, regression = plain.run(["probability", "regression"], {"image": image})
    np.testing.assert_allclose(result["probability"], probability, atol=1e-6)
    np.testing.assert_allclose(result["regression"], regression, atol=1e-6)
    np.testing.assert_allclose(result["probability"].sum(axis=1), 1.0, atol=1e-5)


def test_face_swapper_speaks_fp16(local_models: LocalModels) -> None:
    crop = np.random.default_rng(1).uniform(0, 1, (2, 3, 256, 256)).astype(np.float16)
    result = asyncio.run(
        local_models.infer("face_swapper", {"target": crop, "source": crop[::-1].copy()}, ["swapped", "mask"])
    )
    assert result["swapped"].dtype == np.float16
    assert result["swapped"].shape == (2, 3, 256, 256)
    assert result["mask"].shape == (2, 1, 256, 256)
    assert np.isfinite(result["swapped"]).all()


def test_outputs_take_the_dtype_the_config_declares(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    (repository / "mtcnn_rnet" / "1").mkdir(parents=True)
    shutil.copy(PRODUCTION_REPOSITORY / "mtcnn_rnet/1/model.onnx", repository / "mtcnn_rnet/1/model.onnx")
    config = (PRODUCTION_REPOSITORY / "mtcnn_rnet/config.pbtxt").read_text()
    fp16_probability = config.replace(
        '{ name: "probability" data_type: TYPE_FP32', '{ name: "probability" data_type: TYPE_FP16'
    )
    assert fp16_probability != config
    (repository / "mtcnn_rnet/config.pbtxt").write_text(fp16_probability)

    result = asyncio.run(
        LocalModels(repository).infer(
            "mtcnn_rnet", {"image": np.zeros((1, 3, 24, 24), np.float32)}, ["probability", "regression"]
        )
    )
    assert result["probability"].dtype == np.float16
    assert result["regression"].dtype == np.float32


def test_wrong_inputs_are_invalid_arguments(local_models: LocalModels) -> None:
    with pytest.raises(InvalidArgument, match="takes inputs"):
        asyncio.run(local_models.infer("mtcnn_rnet", {"pixels": np.zeros((1, 3, 24, 24), np.float32)}, ["regression"]))
    with pytest.raises(InvalidArgument, match="mtcnn_rnet"):
        asyncio.run(local_models.infer("mtcnn_rnet", {"image": np.zeros((1, 3, 48, 48), np.float32)}, ["regression"]))
    with pytest.raises(InvalidArgument, match="no outputs"):
        asyncio.run(local_models.infer("mtcnn_rnet", {"image": np.zeros((1, 3, 24, 24), np.float32)}, ["landmarks"]))


def test_unknown_and_unbuilt_models(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no_such_model"):
        asyncio.run(LocalModels(PRODUCTION_REPOSITORY).infer("no_such_model", {}, []))
    (tmp_path / "mtcnn_onet").mkdir()
    shutil.copy(PRODUCTION_REPOSITORY / "mtcnn_onet/config.pbtxt", tmp_path / "mtcnn_onet/config.pbtxt")
    with pytest.raises(FailedPrecondition, match="make models"):
        asyncio.run(LocalModels(tmp_path).infer("mtcnn_onet", {}, []))

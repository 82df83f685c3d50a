from __future__ import annotations

from pathlib import Path

import cv2
import dlib
import numpy as np
import onnxruntime as ort
import pytest
import torch
from skimage import data

from services.common.errors import FailedPrecondition, NotFound
from services.model_build.mtcnn_export import export_mtcnn, load_stage, triton_model_name
from services.model_build.mtcnn_nets import MTCNN_STAGES, STAGE_OUTPUTS, MtcnnStage

WEIGHTS_WHEEL = Path(__file__).resolve().parents[2] / "build/weights/facenet_pytorch-2.6.0-py3-none-any.whl"

# Batch sizes and P-Net sizes that differ from the export example, so the dynamic axes are exercised.
TEST_INPUT_SHAPES: dict[MtcnnStage, tuple[int, int, int, int]] = {
    "pnet": (3, 3, 57, 91),
    "rnet": (5, 3, 24, 24),
    "onet": (7, 3, 48, 48),
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repository")
    export_mtcnn(WEIGHTS_WHEEL, path)
    return path


def _session(repository: Path, stage: MtcnnStage) -> ort.InferenceSession:
    model = repository / triton_model_name(stage) / "1" / "model.onnx"
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def _nchw(image: np.ndarray, side: int) -> np.ndarray:
    resized = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    return resized.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("stage", MTCNN_STAGES)
def test_onnx_matches_torch_on_raw_pixels(repository: Path, stage: MtcnnStage) -> None:
    pixels = np.random.default_rng(7).uniform(0, 255, TEST_INPUT_SHAPES[stage]).astype(np.float32)
    session = _session(repository, stage)
    assert [tensor.name for tensor in session.get_inputs()] == ["image"]
    assert tuple(tensor.name for tensor in session.get_outputs()) == STAGE_OUTPUTS[stage]

    onnx_outputs = session.run(None, {"image": pixels})
    with torch.no_grad():
        torch_outputs = load_stage(WEIGHTS_WHEEL, stage)(torch.from_numpy(pixels))

    for onnx_output, torch_output in zip(onnx_outputs, torch_outputs, strict=True):
        assert onnx_output.shape == tuple(torch_output.shape)
        assert onnx_output.dtype == np.float32
        np.testing.assert_allclose(onnx_output, torch_output.numpy(), atol=1e-4, rtol=0)


def test_pnet_grid_follows_input_size(repository: Path) -> None:
    probability, regression = _session(repository, "pnet").run(None, {"image": np.zeros((1, 3, 30, 50), np.float32)})
    # 3x3 conv, 2x2 ceil pool, two 3x3 convs: out = ceil((side - 2) / 2) - 4
    assert probability.shape == (1, 2, 10, 20)
    assert regression.shape == (1, 4, 10, 20)
    np.testing.assert_allclose(probability.sum(axis=1), 1.0, atol=1e-5)


def test_onet_recognises_a_real_face_and_places_its_landmarks(repository: Path) -> None:
    """dlib's HOG detector, independent of MTCNN, frames the face; O-Net must agree, eyes above mouth."""
    photo = data.astronaut()
    face = dlib.get_frontal_face_detector()(photo, 1)[0]
    face_crop = photo[face.top() : face.bottom(), face.left() : face.right()]
    background_crop = photo[300:400, 350:450]
    session = _session(repository, "onet")

    probability, _, landmarks = session.run(None, {"image": _nchw(face_crop, 48)})
    background_probability = session.run(None, {"image": _nchw(background_crop, 48)})[0]

    assert probability[0, 1] > 0.95
    assert background_probability[0, 1] < 0.5
    xs, ys = landmarks[0, :5], landmarks[0, 5:]
    left_eye, right_eye, nose, mouth_left, mouth_right = range(5)
    assert xs[left_eye] < xs[nose] < xs[right_eye]
    assert xs[mouth_left] < xs[mouth_right]
    assert max(ys[left_eye], ys[right_eye]) < ys[nose] < min(ys[mouth_left], ys[mouth_right])
    assert np.all((landmarks > 0) & (landmarks < 1))


def test_rnet_scores_face_above_background(repository: Path) -> None:
    photo = data.astronaut()
    face = dlib.get_frontal_face_detector()(photo, 1)[0]
    crops = np.concatenate(
        [
            _nchw(photo[face.top() : face.bottom(), face.left() : face.right()], 24),
            _nchw(photo[300:400, 350:450], 24),
        ]
    )
    probability, regression = _session(repository, "rnet").run(None, {"image": crops})
    assert probability[0, 1] > 0.9 > 0.5 > probability[1, 1]
    assert regression.shape == (2, 4)


def test_missing_wheel_is_reported(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="make models"):
        export_mtcnn(tmp_path / "absent.whl", tmp_path / "repository")


def test_wheel_without_weights_is_reported(tmp_path: Path) -> None:
    not_a_wheel = tmp_path / "empty.whl"
    not_a_wheel.write_bytes(b"not a zip")
    with pytest.raises(FailedPrecondition, match="not a zip"):
        export_mtcnn(not_a_wheel, tmp_path / "repository")

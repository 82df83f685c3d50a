from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import cv2
import dlib
import matplotlib.cbook
import numpy as np
import pytest
import torch
from skimage import data

from services.detector.face_detector import CASCADE_OUTPUTS, FRAMES, OPTIONS
from services.model_build.mtcnn_cascade import MtcnnCascade, load_mtcnn_cascade
from services.triton.local_models import LocalModels
from tests.support.identity_judge import SHAPE_PREDICTOR_FILE, models_dir

REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
WEIGHTS_WHEEL = Path(__file__).resolve().parents[2] / "build/weights/facenet_pytorch-2.6.0-py3-none-any.whl"
BACKGROUND = 128
# The width the worker downscales frames to before it asks the detector.
DETECTOR_WIDTH = 640


@pytest.fixture(scope="session")
def local_models() -> LocalModels:
    return LocalModels(REPOSITORY)


@pytest.fixture(scope="session")
def one_torch_thread() -> Iterator[None]:
    """torch's threads contend with the other tests' processes on a small CI machine (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cascade_module(one_torch_thread: None) -> MtcnnCascade:
    return load_mtcnn_cascade(WEIGHTS_WHEEL)


class CascadeRunner:
    """The cascade module on CPU tensors in Triton's place, noting every request's model and inputs."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.requests: list[tuple[str, dict[str, np.ndarray]]] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.requests.append((model, dict(inputs)))
        with torch.inference_mode():
            answer = self.module(torch.from_numpy(inputs[FRAMES]), torch.from_numpy(inputs[OPTIONS]))
        return {name: tensor.numpy() for name, tensor in zip(CASCADE_OUTPUTS, answer, strict=True)}


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def grace_hopper() -> np.ndarray:
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def side_by_side(astronaut: np.ndarray, grace_hopper: np.ndarray) -> np.ndarray:
    """Both photos on one grey canvas, astronaut on the left, at the width the worker sends (640x375)."""
    height = max(astronaut.shape[0], grace_hopper.shape[0])
    canvas = np.full((height, astronaut.shape[1] + grace_hopper.shape[1], 3), BACKGROUND, np.uint8)
    canvas[: astronaut.shape[0], : astronaut.shape[1]] = astronaut
    canvas[: grace_hopper.shape[0], astronaut.shape[1] :] = grace_hopper
    size = (DETECTOR_WIDTH, round(height * DETECTOR_WIDTH / canvas.shape[1]))
    return cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)


class DlibReference:
    """dlib's HOG detector and 68-point predictor: a face finder independent of MTCNN."""

    def __init__(self) -> None:
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(models_dir() / SHAPE_PREDICTOR_FILE))

    def only_face(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The box (x1, y1, x2, y2) and the eye centres (image-left first) of the one face found."""
        (rect,) = self._detector(image, 0)
        shape = self._predictor(image, rect)
        points = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
        eyes = np.stack([points[36:42].mean(axis=0), points[42:48].mean(axis=0)])
        return np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32), eyes


@pytest.fixture(scope="session")
def dlib_reference() -> DlibReference:
    return DlibReference()

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np
import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.face_types import DetectedFace
from services.detector import face_detector
from services.detector.box_ops import pyramid_scales
from services.detector.face_detector import (
    ONET_MODEL,
    PNET_MODEL,
    RNET_MODEL,
    DetectionDefaults,
    FaceDetector,
)
from services.triton.local_models import LocalModels
from tests.detector.conftest import BACKGROUND, DlibReference


class RecordingRunner:
    """LocalModels that also notes every request's model and batch shape."""

    def __init__(self, inner: LocalModels) -> None:
        self.inner = inner
        self.requests: list[tuple[str, tuple[int, ...]]] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.requests.append((model, inputs["image"].shape))
        return await self.inner.infer(model, inputs, outputs)

    def shapes(self, model: str) -> list[tuple[int, ...]]:
        return [shape for name, shape in self.requests if name == model]


def detect(runner: LocalModels | RecordingRunner, frames: np.ndarray, **options: float) -> list[list[DetectedFace]]:
    return asyncio.run(FaceDetector(runner).detect(frames, **options))  # type: ignore[arg-type]


def centre(box: tuple[float, float, float, float]) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def width(box: tuple[float, float, float, float]) -> float:
    return box[2] - box[0]


def overlap(a: tuple[float, float, float, float], b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def assert_matches_reference(face: DetectedFace, image: np.ndarray, reference: DlibReference) -> None:
    dlib_box, dlib_eyes = reference.only_face(image)
    assert overlap(face.box, dlib_box) > 0.5
    # Eye centres within a tenth of the face width of dlib's.
    assert np.linalg.norm(face.landmarks[:2] - dlib_eyes, axis=1).max() < 0.1 * width(face.box)


def assert_plausible_landmarks(face: DetectedFace) -> None:
    left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    x1, y1, x2, y2 = face.box
    assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2))
    assert np.all((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2))


def test_astronaut_has_one_face_where_dlib_finds_it(
    local_models: LocalModels, astronaut: np.ndarray, dlib_reference: DlibReference
) -> None:
    (faces,) = detect(local_models, astronaut[None])
    assert len(faces) == 1
    face = faces[0]
    assert face.score >= 0.7 and face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    assert_matches_reference(face, astronaut, dlib_reference)
    assert_plausible_landmarks(face)


def test_grace_hopper_has_one_face_where_dlib_finds_it(
    local_models: LocalModels, grace_hopper: np.ndarray, dlib_reference: DlibReference
) -> None:
    (faces,) = detect(local_models, grace_hopper[None])
    assert len(faces) == 1
    assert_matches_reference(faces[0], grace_hopper, dlib_reference)
    assert_plausible_landmarks(faces[0])


def test_side_by_side_photos_have_two_faces_one_per_half(local_models: LocalModels, side_by_side: np.ndarray) -> None:
    (faces,) = detect(local_models, side_by_side[None])
    assert len(faces) == 2
    assert faces[0].score >= faces[1].score
    halves = sorted(centre(face.box)[0] > side_by_side.shape[1] / 2 for face in faces)
    assert halves == [False, True]


def test_flat_grey_frame_has_no_faces(local_models: LocalModels) -> None:
    assert detect(local_models, np.full((2, 360, 640, 3), BACKGROUND, np.uint8)) == [[], []]


def test_batch_answers_per_frame_in_order(local_models: LocalModels, side_by_side: np.ndarray) -> None:
    half = side_by_side.shape[1] // 2
    grey = np.full_like(side_by_side, BACKGROUND)
    left_only = side_by_side.copy()
    left_only[:, half:] = BACKGROUND
    right_only = side_by_side.copy()
    right_only[:, :half] = BACKGROUND
    batch = np.stack([right_only, grey, side_by_side, left_only])
    found = detect(local_models, batch)
    assert [len(faces) for faces in found] == [1, 0, 2, 1]
    assert centre(found[0][0].box)[0] > half > centre(found[3][0].box)[0]
    # Batching changes nothing: frame 3 alone gives the same face.
    (alone,) = detect(local_models, left_only[None])
    assert np.allclose(alone[0].box, found[3][0].box, atol=1e-3)


def test_doubling_the_image_doubles_the_box(local_models: LocalModels, astronaut: np.ndarray) -> None:
    (small,) = detect(local_models, astronaut[None])
    doubled = cv2.resize(astronaut, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    (large,) = detect(local_models, doubled[None])
    assert len(small) == len(large) == 1
    assert width(large[0].box) / width(small[0].box) == pytest.approx(2.0, rel=0.1)
    assert np.allclose(centre(large[0].box), 2 * centre(small[0].box), atol=0.05 * width(large[0].box))
    assert np.allclose(large[0].landmarks, 2 * small[0].landmarks, atol=0.05 * width(large[0].box))


def test_min_face_size_above_the_face_finds_nothing(local_models: LocalModels, astronaut: np.ndarray) -> None:
    (faces,) = detect(local_models, astronaut[None])
    face_side = width(faces[0].box)
    assert len(detect(local_models, astronaut[None], min_face_size=int(face_side * 0.6))[0]) == 1
    assert detect(local_models, astronaut[None], min_face_size=int(face_side * 3)) == [[]]


def test_min_score_above_the_face_score_finds_nothing(local_models: LocalModels, astronaut: np.ndarray) -> None:
    (faces,) = detect(local_models, astronaut[None])
    assert detect(local_models, astronaut[None], min_score=min(1.0, faces[0].score + 1e-6)) == [[]]


def test_gpu_work_is_batched_across_frames(local_models: LocalModels, side_by_side: np.ndarray) -> None:
    runner = RecordingRunner(local_models)
    frames = np.stack([side_by_side] * 3)
    found = detect(runner, frames, min_face_size=40)
    assert [len(faces) for faces in found] == [2, 2, 2]
    pnet = runner.shapes(PNET_MODEL)
    height, width_ = side_by_side.shape[:2]
    assert len(pnet) == len(pyramid_scales(min(height, width_), 40, DetectionDefaults().scale_factor))
    assert all(shape[0] == 3 for shape in pnet)
    assert len({shape[2:] for shape in pnet}) == len(pnet)
    (rnet,) = runner.shapes(RNET_MODEL)
    (onet,) = runner.shapes(ONET_MODEL)
    assert rnet[1:] == (3, 24, 24) and onet[1:] == (3, 48, 48) and rnet[0] > onet[0] >= 6


def test_requests_are_split_at_the_model_max_batch(
    local_models: LocalModels, side_by_side: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = np.stack([side_by_side] * 3)
    whole = detect(local_models, frames, min_face_size=40)
    monkeypatch.setattr(face_detector, "PNET_MAX_BATCH", 2)
    monkeypatch.setattr(face_detector, "RNET_MAX_BATCH", 16)
    monkeypatch.setattr(face_detector, "ONET_MAX_BATCH", 4)
    runner = RecordingRunner(local_models)
    split = detect(runner, frames, min_face_size=40)
    assert max(shape[0] for shape in runner.shapes(PNET_MODEL)) == 2
    assert len(runner.shapes(RNET_MODEL)) > 1 and max(shape[0] for shape in runner.shapes(RNET_MODEL)) <= 16
    assert len(runner.shapes(ONET_MODEL)) > 1 and max(shape[0] for shape in runner.shapes(ONET_MODEL)) <= 4
    assert [[face.box for face in faces] for faces in split] == [[face.box for face in faces] for faces in whole]


class _RnetOutOfMemory(RecordingRunner):
    """R-Net runs out of memory on more than `crops` crops a request."""

    def __init__(self, inner: LocalModels, crops: int) -> None:
        super().__init__(inner)
        self.crops = crops

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        if model == RNET_MODEL and len(inputs["image"]) > self.crops:
            self.requests.append((model, inputs["image"].shape))
            raise ResourceExhausted(f"triton model {model}: out of memory")
        return await super().infer(model, inputs, outputs)


def test_out_of_memory_shrinks_every_models_batches_and_the_answer_stays_the_same(
    local_models: LocalModels, side_by_side: np.ndarray
) -> None:
    frames = np.stack([side_by_side] * 3)
    whole = detect(local_models, frames, min_face_size=40)
    runner = _RnetOutOfMemory(local_models, crops=8)
    shrunk = detect(runner, frames, min_face_size=40)
    sizes = [shape[0] for shape in runner.shapes(RNET_MODEL)]
    # The first request ran out of memory; halved until they fit, the answered ones cover every crop.
    assert sizes[0] > 8 and sum(size for size in sizes if size <= 8) == sizes[0]
    assert [[face.box for face in faces] for faces in shrunk] == [[face.box for face in faces] for faces in whole]


def test_empty_batch_sends_nothing(local_models: LocalModels) -> None:
    runner = RecordingRunner(local_models)
    assert detect(runner, np.zeros((0, 360, 640, 3), np.uint8)) == []
    assert runner.requests == []


def test_frames_smaller_than_the_minimum_face_send_nothing(local_models: LocalModels) -> None:
    runner = RecordingRunner(local_models)
    assert detect(runner, np.zeros((2, 16, 16, 3), np.uint8)) == [[], []]
    assert runner.requests == []


@pytest.mark.parametrize(
    ("frames", "options", "message"),
    [
        (np.zeros((1, 32, 32), np.uint8), {}, "must be \\(count, height, width, 3\\)"),
        (np.zeros((1, 32, 32, 3), np.float32), {}, "must be uint8"),
        (np.zeros((1, 32, 32, 3), np.uint8), {"min_face_size": 0}, "min_face_size 0 is not positive"),
        (np.zeros((1, 32, 32, 3), np.uint8), {"min_score": 1.5}, "min_score 1.5 is outside 0..1"),
    ],
)
def test_invalid_requests_are_refused(
    local_models: LocalModels, frames: np.ndarray, options: dict[str, float], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        detect(local_models, frames, **options)


@pytest.mark.parametrize(
    ("field", "value"), [("min_face_size", 0), ("scale_factor", 1.0), ("pnet_score", -0.1), ("min_score", 2.0)]
)
def test_invalid_defaults_are_refused(field: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=field):
        DetectionDefaults(**{field: value})  # type: ignore[arg-type]


def test_pnet_requests_of_large_frames_are_split_by_size(
    local_models: LocalModels, side_by_side: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = np.stack([side_by_side] * 2)
    monkeypatch.setattr(face_detector, "MAX_REQUEST_BYTES", 1)
    runner = RecordingRunner(local_models)
    found = detect(runner, frames, min_face_size=40)
    assert {shape[0] for shape in runner.shapes(PNET_MODEL)} == {1}
    assert [len(faces) for faces in found] == [2, 2]


class MalformingRunner:
    """LocalModels, except that one model's answer is rewritten by `malform`."""

    def __init__(
        self, inner: LocalModels, model: str, malform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    ) -> None:
        self.inner = inner
        self.model = model
        self.malform = malform

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        answer = await self.inner.infer(model, inputs, outputs)
        return self.malform(answer) if model == self.model else answer


@pytest.mark.parametrize(
    ("model", "malform", "problem"),
    [
        (
            RNET_MODEL,
            lambda answer: {**answer, "probability": answer["probability"][:0]},
            r"'probability' of shape \(0, 2\)",
        ),
        (
            ONET_MODEL,
            lambda answer: {**answer, "landmarks": answer["landmarks"][:, :5]},
            r"'landmarks' of shape \(\d+, 5\)",
        ),
        (PNET_MODEL, lambda answer: {**answer, "regression": answer["regression"][:, :, :-1]}, "different grid sizes"),
        (
            ONET_MODEL,
            lambda answer: {name: value for name, value in answer.items() if name != "regression"},
            "no 'regression' output",
        ),
    ],
    ids=["rnet-empty", "onet-landmarks", "pnet-grids", "onet-missing"],
)
def test_a_model_answer_of_the_wrong_shape_fails_naming_the_model(
    local_models: LocalModels,
    astronaut: np.ndarray,
    model: str,
    malform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    problem: str,
) -> None:
    runner = MalformingRunner(local_models, model, malform)
    with pytest.raises(FailedPrecondition, match=f"model {model} returned .*{problem}"):
        asyncio.run(FaceDetector(runner).detect(astronaut[None]))

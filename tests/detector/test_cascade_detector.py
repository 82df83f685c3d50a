from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.face_types import DetectedFace
from services.detector import face_detector
from services.detector.face_detector import (
    CASCADE_MODEL,
    CASCADE_OPTIONS,
    CascadeFaceDetector,
    DetectionDefaults,
    FaceDetector,
    check_cascade_outputs,
    faces_from_cascade,
)
from services.model_build.mtcnn_cascade import MtcnnCascade
from services.triton.local_models import LocalModels
from tests.detector.conftest import BACKGROUND, CascadeRunner

Answer = dict[str, np.ndarray]


class FixedRunner:
    """Answers every request with `answer(count)` for its number of frames."""

    def __init__(self, answer: Callable[[int], Mapping[str, np.ndarray]]) -> None:
        self.answer = answer

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Answer:
        return dict(self.answer(len(inputs["frames"])))


def detect(runner: object, frames: np.ndarray, **options: float) -> list[list[DetectedFace]]:
    return asyncio.run(CascadeFaceDetector(runner).detect(frames, **options))  # type: ignore[arg-type]


def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_same_faces(found: list[list[DetectedFace]], expected: list[list[DetectedFace]]) -> None:
    assert [len(faces) for faces in found] == [len(faces) for faces in expected]
    for faces, expected_faces in zip(found, expected, strict=True):
        for face, expected_face in zip(faces, expected_faces, strict=True):
            assert overlap(face.box, expected_face.box) > 0.8
            assert np.abs(face.landmarks - expected_face.landmarks).max() < 3.0
            assert face.score == pytest.approx(expected_face.score, abs=0.01)
            assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (5, 2)


def batch_of_four(side_by_side: np.ndarray) -> np.ndarray:
    half = side_by_side.shape[1] // 2
    right_only = side_by_side.copy()
    right_only[:, :half] = BACKGROUND
    left_only = side_by_side.copy()
    left_only[:, half:] = BACKGROUND
    return np.stack([right_only, np.full_like(side_by_side, BACKGROUND), side_by_side, left_only])


@pytest.mark.parametrize("photo", ["astronaut", "grace_hopper", "side_by_side", "batch_of_four"])
def test_the_cascade_finds_the_faces_the_per_stage_detector_finds(
    photo: str,
    request: pytest.FixtureRequest,
    cascade_module: MtcnnCascade,
    local_models: LocalModels,
) -> None:
    frames = (
        batch_of_four(request.getfixturevalue("side_by_side"))
        if photo == "batch_of_four"
        else request.getfixturevalue(photo)[None]
    )
    expected = asyncio.run(FaceDetector(local_models).detect(frames))
    found = detect(CascadeRunner(cascade_module), frames)
    assert_same_faces(found, expected)
    assert sum(len(faces) for faces in found) >= 1


def test_one_request_carries_the_batch_and_the_request_thresholds(
    cascade_module: MtcnnCascade, side_by_side: np.ndarray
) -> None:
    runner = CascadeRunner(cascade_module)
    frames = np.stack([side_by_side] * 3)
    found = detect(runner, frames, min_face_size=30, min_score=0.8)
    assert [len(faces) for faces in found] == [2, 2, 2]
    ((model, inputs),) = runner.requests
    assert model == CASCADE_MODEL and inputs["frames"].shape == frames.shape
    expected_row = {**vars(DetectionDefaults()), "min_face_size": 30, "min_score": 0.8}
    assert inputs["options"].dtype == np.float32
    assert inputs["options"].tolist() == [[np.float32(expected_row[name]) for name in CASCADE_OPTIONS]] * 3


def test_requests_are_split_at_the_model_max_batch_and_by_size(
    cascade_module: MtcnnCascade, side_by_side: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = np.stack([side_by_side] * 5)
    monkeypatch.setattr(face_detector, "CASCADE_MAX_BATCH", 2)
    runner = CascadeRunner(cascade_module)
    found = detect(runner, frames)
    assert [len(inputs["frames"]) for _, inputs in runner.requests] == [2, 2, 1]
    assert [len(faces) for faces in found] == [2] * 5
    monkeypatch.setattr(face_detector, "MAX_REQUEST_BYTES", 1)
    runner = CascadeRunner(cascade_module)
    detect(runner, frames[:2])
    assert [len(inputs["frames"]) for _, inputs in runner.requests] == [1, 1]


def test_request_thresholds_above_the_face_find_nothing(cascade_module: MtcnnCascade, astronaut: np.ndarray) -> None:
    runner = CascadeRunner(cascade_module)
    ((face,),) = detect(runner, astronaut[None])
    assert detect(runner, astronaut[None], min_score=min(1.0, face.score + 1e-6)) == [[]]
    assert detect(runner, astronaut[None], min_face_size=int((face.box[2] - face.box[0]) * 3)) == [[]]


def test_a_frame_with_more_faces_than_the_model_answers_keeps_the_best(
    cascade_module: MtcnnCascade, side_by_side: np.ndarray
) -> None:
    one_face = MtcnnCascade(max_faces=1)
    one_face.load_state_dict(cascade_module.state_dict())
    (both,) = detect(CascadeRunner(cascade_module), side_by_side[None])
    (best,) = detect(CascadeRunner(one_face.eval()), side_by_side[None])
    assert len(both) == 2 and len(best) == 1
    assert best[0].box == both[0].box and best[0].score == max(face.score for face in both)


def test_empty_batches_and_frames_below_the_minimum_face_send_nothing(cascade_module: MtcnnCascade) -> None:
    runner = CascadeRunner(cascade_module)
    assert detect(runner, np.zeros((0, 360, 640, 3), np.uint8)) == []
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
def test_invalid_requests_are_refused_before_the_model(
    cascade_module: MtcnnCascade, frames: np.ndarray, options: dict[str, float], message: str
) -> None:
    runner = CascadeRunner(cascade_module)
    with pytest.raises(InvalidArgument, match=message):
        detect(runner, frames, **options)
    assert runner.requests == []


class _OutOfMemoryAbove:
    """The cascade runner, out of GPU memory for requests of more than `frames` frames."""

    def __init__(self, runner: CascadeRunner, frames: int) -> None:
        self.runner, self.frames = runner, frames
        self.sizes: list[int] = []

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Answer:
        self.sizes.append(len(inputs["frames"]))
        if len(inputs["frames"]) > self.frames:
            raise ResourceExhausted(f"triton model {model}: out of memory")
        return dict(await self.runner.infer(model, inputs, outputs))


def test_out_of_memory_halves_the_frames_a_request_carries_and_every_frame_is_answered(
    cascade_module: MtcnnCascade, side_by_side: np.ndarray
) -> None:
    runner = _OutOfMemoryAbove(CascadeRunner(cascade_module), frames=1)
    detector = CascadeFaceDetector(runner)
    found = asyncio.run(detector.detect(np.stack([side_by_side] * 3)))
    assert runner.sizes == [3, 1, 1, 1] and [len(faces) for faces in found] == [2, 2, 2]
    asyncio.run(detector.detect(np.stack([side_by_side] * 2)))
    assert runner.sizes[4:] == [1, 1]


def padded_answer(count: int, limit: int = 4, faces: Sequence[int] = ()) -> Answer:
    """A well-formed answer: frame f has faces[f] faces (default none), numbered so each value is traceable."""
    counts = np.array([[faces[frame] if frame < len(faces) else 0] for frame in range(count)], np.int32)
    boxes = np.zeros((count, limit, 4), np.float32)
    scores = np.zeros((count, limit), np.float32)
    landmarks = np.zeros((count, limit, 5, 2), np.float32)
    for frame in range(count):
        for row in range(int(counts[frame, 0])):
            boxes[frame, row] = [10 * row, 10 * frame, 10 * row + 8, 10 * frame + 8]
            scores[frame, row] = 0.99 - 0.01 * row
            landmarks[frame, row] = np.arange(10, dtype=np.float32).reshape(5, 2) + 100 * frame + row
    return {"boxes": boxes, "scores": scores, "landmarks": landmarks, "counts": counts}


def test_padded_outputs_become_each_frames_faces_in_order() -> None:
    answer = padded_answer(3, limit=4, faces=[2, 0, 4])
    faces = faces_from_cascade(check_cascade_outputs(CASCADE_MODEL, answer, 3))
    assert [len(frame_faces) for frame_faces in faces] == [2, 0, 4]
    assert faces[0][1].box == (10.0, 0.0, 18.0, 8.0) and faces[2][3].box == (30.0, 20.0, 38.0, 28.0)
    assert [face.score for face in faces[2]] == pytest.approx([0.99, 0.98, 0.97, 0.96])
    assert np.array_equal(faces[2][1].landmarks, np.arange(10, dtype=np.float32).reshape(5, 2) + 201)


def test_nan_in_padding_rows_is_ignored() -> None:
    answer = padded_answer(1, faces=[1])
    answer["boxes"][0, 1:] = np.nan
    ((face,),) = faces_from_cascade(check_cascade_outputs(CASCADE_MODEL, answer, 1))
    assert face.box == (0.0, 0.0, 8.0, 8.0)


def malformed(change: Callable[[Answer], None]) -> Callable[[int], Answer]:
    def answer(count: int) -> Answer:
        result = padded_answer(count, faces=[1] * count)
        change(result)
        return result

    return answer


def set_item(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[Answer], None]:
    def change(answer: Answer) -> None:
        answer[name] = value(answer[name])

    return change


def put_nan(name: str) -> Callable[[Answer], None]:
    def change(answer: Answer) -> None:
        answer[name][0, 0] = np.nan

    return change


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda answer: answer.pop("landmarks"), "no 'landmarks' output"),
        # What Triton's Python backend answered under numpy 2: every output empty.
        (lambda answer: answer.update({name: np.zeros(0, np.float32) for name in answer}), r"'boxes' of shape \(0,\)"),
        (set_item("boxes", lambda boxes: boxes[:, :, :2]), r"'boxes' of shape \(2, 4, 2\)"),
        (set_item("boxes", lambda boxes: boxes[:, :0]), r"'boxes' of shape \(2, 0, 4\)"),
        (set_item("scores", lambda scores: scores[:, :3]), r"'scores' of shape \(2, 3\).*expected \(2, 4\)"),
        (set_item("landmarks", lambda points: points.reshape(2, 4, 10)), r"'landmarks' of shape \(2, 4, 10\)"),
        (set_item("counts", lambda counts: counts.ravel()), r"'counts' of shape \(2,\).*expected \(2, 1\)"),
        (set_item("counts", lambda counts: counts.astype(np.float32)), "'counts' of type float32"),
        (set_item("counts", lambda counts: counts + 4), r"face counts outside 0..4: \[5, 5\]"),
        (set_item("counts", lambda counts: counts - 2), "face counts outside 0..4"),
        (put_nan("boxes"), "NaN or infinite 'boxes'"),
        (put_nan("scores"), "NaN or infinite 'scores'"),
        (put_nan("landmarks"), "NaN or infinite 'landmarks'"),
    ],
    ids=[
        "missing",
        "all-empty",
        "box-width",
        "no-rows",
        "scores-rows",
        "landmarks-shape",
        "counts-flat",
        "counts-float",
        "counts-above",
        "counts-negative",
        "nan-box",
        "nan-score",
        "nan-landmark",
    ],
)
def test_a_malformed_answer_fails_naming_the_model_never_no_face(
    change: Callable[[Answer], None], problem: str, astronaut: np.ndarray
) -> None:
    runner = FixedRunner(malformed(change))
    with pytest.raises(FailedPrecondition, match=f"model {CASCADE_MODEL} returned (.* )?{problem}"):
        detect(runner, np.stack([astronaut, astronaut]))


def test_the_well_formed_fixed_answer_passes(astronaut: np.ndarray) -> None:
    found = detect(FixedRunner(malformed(lambda answer: None)), np.stack([astronaut, astronaut]))
    assert [len(faces) for faces in found] == [1, 1]

from __future__ import annotations

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.face_types import DetectedFace
from services.common.job_vocabulary import SELECTOR_MODES, selector_mode_from_proto
from services.worker.face_embedder import face_descriptor
from services.worker.face_selector import FaceSelection, select_faces
from swapline.jobs.v1 import jobs_pb2
from tests.worker.face_photos import (
    astronaut,
    astronaut_landmarks,
    face_from_landmarks,
    grace_hopper,
    grace_hopper_landmarks,
    side_by_side,
)


def _box_face(x1: float, y1: float, size: float) -> DetectedFace:
    landmarks = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32) * size + np.array(
        [x1, y1], np.float32
    )
    return DetectedFace(box=(x1, y1, x1 + size, y1 + size), score=0.9, landmarks=landmarks)


def test_one_picks_the_largest_face() -> None:
    frame = np.zeros((400, 400, 3), np.uint8)
    faces = [_box_face(10, 10, 50), _box_face(100, 100, 120), _box_face(250, 20, 80)]
    assert select_faces(frame, faces, FaceSelection("one")) == [faces[1]]
    assert select_faces(frame, [], FaceSelection("one")) == []


def test_many_keeps_every_face_in_order() -> None:
    frame = np.zeros((400, 400, 3), np.uint8)
    faces = [_box_face(10, 10, 50), _box_face(100, 100, 120), _box_face(250, 20, 80)]
    assert select_faces(frame, faces, FaceSelection("many")) == faces


def test_every_proto_selector_maps_to_a_mode() -> None:
    assert selector_mode_from_proto(jobs_pb2.FACE_SELECTOR_MODE_ONE) == "one"
    assert selector_mode_from_proto(jobs_pb2.FACE_SELECTOR_MODE_MANY) == "many"
    assert selector_mode_from_proto(jobs_pb2.FACE_SELECTOR_MODE_REFERENCE) == "reference"
    assert selector_mode_from_proto(jobs_pb2.FACE_SELECTOR_MODE_UNSPECIFIED) in SELECTOR_MODES
    with pytest.raises(InvalidArgument):
        selector_mode_from_proto(99)


def test_reference_mode_needs_a_reference() -> None:
    with pytest.raises(InvalidArgument):
        FaceSelection("reference")


def _transformed(frame: np.ndarray, scale: float, angle: float, gain: int) -> tuple[np.ndarray, np.ndarray]:
    centre = (frame.shape[1] / 2, frame.shape[0] / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    size = (int(frame.shape[1] * scale), int(frame.shape[0] * scale))
    matrix[:, 2] = matrix[:, 2] + np.array(size) / 2 - centre
    warped = cv2.warpAffine(frame, matrix, size, flags=cv2.INTER_AREA)
    return np.clip(warped.astype(np.int16) + gain, 0, 255).astype(np.uint8), matrix.astype(np.float32)


@pytest.mark.parametrize(
    ("scale", "angle", "gain"),
    [
        (1.0, 0.0, 0),
        (0.4, 0.0, 0),
        (1.5, 0.0, 0),
        (1.0, 7.0, 0),
        (0.6, -7.0, 0),
        (1.0, 0.0, 50),
        (0.8, 5.0, -50),
    ],
)
def test_reference_matches_only_the_same_person(scale: float, angle: float, gain: int) -> None:
    frame, astronaut_points, hopper_points = side_by_side()
    image, matrix = _transformed(frame, scale, angle, gain)
    faces = [
        face_from_landmarks(points @ matrix[:, :2].T + matrix[:, 2]) for points in (astronaut_points, hopper_points)
    ]
    astronaut_reference = FaceSelection("reference", face_descriptor(astronaut(), astronaut_landmarks()))
    hopper_reference = FaceSelection("reference", face_descriptor(grace_hopper(), grace_hopper_landmarks()))

    assert select_faces(image, faces, astronaut_reference) == [faces[0]]
    assert select_faces(image, faces, hopper_reference) == [faces[1]]

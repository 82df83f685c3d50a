from __future__ import annotations

import asyncio
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.face_types import DetectedFace
from services.common.job_vocabulary import SELECTOR_MODES, selector_mode_from_proto
from services.worker.arcface_embedder import SAME_PERSON_DISTANCE, ArcFaceEmbedder, identity_distance, unit_length
from services.worker.face_aligner import align_face
from services.worker.face_embedder import face_descriptor
from services.worker.face_selector import FaceSelection, select_batch, select_faces
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


class _OneHotArcFace:
    """A recogniser that knows one face: the astronaut's crop on ArcFace's layout answers axis 0, any other axis 1."""

    def __init__(self, known: np.ndarray) -> None:
        self.known = known.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        self.batches: list[tuple[int, ...]] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        faces = inputs["input"]
        self.batches.append(faces.shape)
        embeddings = np.zeros((len(faces), 512), np.float32)
        for row, face in enumerate(faces):
            embeddings[row, 0 if np.abs(face - self.known).max() < 1e-3 else 1] = 5.0
        return {"fc1": embeddings}

    async def output_names(self, model: str) -> tuple[str, ...]:
        return ("fc1",)

    async def is_model_ready(self, model: str) -> bool:
        return True


def test_by_arcface_a_batchs_faces_are_compared_in_one_request() -> None:
    frame, astronaut_points, hopper_points = side_by_side()
    faces = [face_from_landmarks(astronaut_points), face_from_landmarks(hopper_points)]
    layout = ArcFaceEmbedder(typing.cast(Any, None), typing.cast(Any, None)).layout
    known = align_face(frame, astronaut_points, layout.size, layout.template).crop
    recogniser = _OneHotArcFace(known)
    arcface = ArcFaceEmbedder(recogniser, recogniser)
    reference = np.eye(512, dtype=np.float32)[0]
    selection = FaceSelection("reference", reference, SAME_PERSON_DISTANCE, arcface)

    chosen = asyncio.run(select_batch(np.stack([frame, frame]), [faces, faces[1:]], selection))

    assert chosen == [[faces[0]], []]
    assert recogniser.batches == [(3, 3, 112, 112)]


def test_identity_distance_is_facefusions_half_cosine_distance() -> None:
    reference = unit_length(np.array([1.0, 0.0], np.float32))
    others = unit_length(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32))
    np.testing.assert_allclose(identity_distance(reference, others), [0.0, 0.5, 1.0])

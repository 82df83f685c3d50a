"""A detected face and its conversion to and from the FrameFaces message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from swapline.common.v1 import common_pb2


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def scaled(self, factor: float) -> DetectedFace:
        return DetectedFace(
            box=tuple(float(v * factor) for v in self.box),  # type: ignore[arg-type]
            score=self.score,
            landmarks=(self.landmarks * np.float32(factor)).astype(np.float32),
        )


def face_to_proto(face: DetectedFace) -> common_pb2.Face:
    x1, y1, x2, y2 = face.box
    message = common_pb2.Face(box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2), score=face.score)
    for x, y in face.landmarks:
        message.landmarks.add(x=float(x), y=float(y))
    return message


def face_from_proto(message: common_pb2.Face) -> DetectedFace:
    box = message.box
    points = np.array([[p.x, p.y] for p in message.landmarks], np.float32).reshape(-1, 2)
    return DetectedFace(box=(box.x1, box.y1, box.x2, box.y2), score=message.score, landmarks=points)


def frames_faces_to_proto(
    indices: Sequence[int], faces: Sequence[Sequence[DetectedFace]]
) -> list[common_pb2.FrameFaces]:
    return [
        common_pb2.FrameFaces(frame_index=int(index), faces=[face_to_proto(face) for face in frame_faces])
        for index, frame_faces in zip(indices, faces, strict=True)
    ]


def frames_faces_from_proto(messages: Sequence[common_pb2.FrameFaces]) -> list[list[DetectedFace]]:
    return [[face_from_proto(face) for face in message.faces] for message in messages]

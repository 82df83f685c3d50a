"""Package-shipped photos and their five landmarks (found by the independent dlib judge), cached."""

from __future__ import annotations

from functools import lru_cache

import cv2
import matplotlib.cbook
import numpy as np
import skimage.data

from services.common.face_types import DetectedFace
from tests.support.identity_judge import IdentityJudge


@lru_cache(maxsize=1)
def judge() -> IdentityJudge:
    return IdentityJudge()


@lru_cache(maxsize=1)
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut())


@lru_cache(maxsize=1)
def grace_hopper() -> np.ndarray:
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@lru_cache(maxsize=4)
def _landmarks(name: str) -> np.ndarray:
    image = {"astronaut": astronaut, "grace_hopper": grace_hopper}[name]()
    points = judge().five_points(image)
    if points is None:
        raise AssertionError(f"the dlib judge found no face in the {name} photo")
    return points


def astronaut_landmarks() -> np.ndarray:
    return _landmarks("astronaut").copy()


def grace_hopper_landmarks() -> np.ndarray:
    return _landmarks("grace_hopper").copy()


def face_from_landmarks(landmarks: np.ndarray, margin: float = 0.6) -> DetectedFace:
    """A face whose box spans the landmarks widened by `margin` of their extent on each side."""
    low, high = landmarks.min(axis=0), landmarks.max(axis=0)
    pad = (high - low) * margin
    x1, y1 = (low - pad).tolist()
    x2, y2 = (high + pad).tolist()
    return DetectedFace(box=(x1, y1, x2, y2), score=0.99, landmarks=landmarks.astype(np.float32))


def side_by_side() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The astronaut and Grace Hopper in one frame, with each one's landmarks in that frame."""
    left, right = astronaut(), grace_hopper()
    height = max(left.shape[0], right.shape[0])
    frame = np.zeros((height, left.shape[1] + right.shape[1], 3), np.uint8)
    frame[: left.shape[0], : left.shape[1]] = left
    frame[: right.shape[0], left.shape[1] :] = right
    offset = np.array([left.shape[1], 0], np.float32)
    return frame, astronaut_landmarks(), grace_hopper_landmarks() + offset

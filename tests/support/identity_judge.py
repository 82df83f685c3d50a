"""An independent identity judge for tests: dlib's ResNet face descriptor.

dlib shares no code or weights with the project's detector or swapper, so its verdict on a swapped
frame is evidence, not an echo. Two descriptors of the same person are usually closer than
SAME_PERSON_DISTANCE.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import dlib
import numpy as np

SAME_PERSON_DISTANCE = 0.6
# The rule a swapped face must meet to carry the source identity (issue 12): closer to the source than
# SOURCE_DISTANCE_LIMIT, and closer to the source than to the original face by at least SOURCE_MARGIN.
SOURCE_DISTANCE_LIMIT = 0.5
SOURCE_MARGIN = 0.15
SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
DESCRIPTOR_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# Index ranges of the 68-point (iBUG 300-W) markup.
_RIGHT_EYE = slice(36, 42)  # the subject's right eye, on the image's left
_LEFT_EYE = slice(42, 48)
_NOSE_TIP = 30
_MOUTH_RIGHT = 48
_MOUTH_LEFT = 54


def models_dir() -> Path:
    """face_recognition_models' data folder, found without importing the package (it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the face_recognition_models package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class IdentityJudge:
    def __init__(self, upsample_times: int = 1) -> None:
        folder = models_dir()
        self._detector = dlib.get_frontal_face_detector()
        self._shape_predictor = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
        self._recogniser = dlib.face_recognition_model_v1(str(folder / DESCRIPTOR_MODEL_FILE))
        self._upsample_times = upsample_times

    def _largest_face_shape(self, image_rgb: np.ndarray) -> dlib.full_object_detection | None:
        image = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        rectangles = self._detector(image, self._upsample_times)
        if len(rectangles) == 0:
            return None
        largest = max(rectangles, key=lambda rectangle: rectangle.area())
        return self._shape_predictor(image, largest)

    def face_rectangles(self, image_rgb: np.ndarray) -> list[dlib.rectangle]:
        return list(self._detector(np.ascontiguousarray(image_rgb, dtype=np.uint8), self._upsample_times))

    def descriptor_in(self, image_rgb: np.ndarray, rectangle: dlib.rectangle) -> np.ndarray:
        """The 128-d descriptor of whatever lies in `rectangle`, found there or not: a face that a swap
        destroyed still gets a descriptor, far from everyone's."""
        image = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        shape = self._shape_predictor(image, rectangle)
        return np.asarray(self._recogniser.compute_face_descriptor(image, shape), dtype=np.float64)

    def descriptor(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """The 128-d descriptor of the largest face, or None when no face is found."""
        shape = self._largest_face_shape(image_rgb)
        if shape is None:
            return None
        image = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        return np.asarray(self._recogniser.compute_face_descriptor(image, shape), dtype=np.float64)

    def landmarks68(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """(68, 2) float32 landmarks (x, y) of the largest face, or None."""
        shape = self._largest_face_shape(image_rgb)
        if shape is None:
            return None
        return np.array([[point.x, point.y] for point in shape.parts()], dtype=np.float32)

    def five_points(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """(5, 2) float32 in the detector's order: eye on the image's left, other eye, nose tip,
        mouth corner on the image's left, other mouth corner."""
        points = self.landmarks68(image_rgb)
        if points is None:
            return None
        return five_points_from_68(points)

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def five_points_from_68(points: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            points[_RIGHT_EYE].mean(axis=0),
            points[_LEFT_EYE].mean(axis=0),
            points[_NOSE_TIP],
            points[_MOUTH_RIGHT],
            points[_MOUTH_LEFT],
        ]
    ).astype(np.float32)


def carries_source(to_source: float, to_original: float) -> bool:
    return to_source < SOURCE_DISTANCE_LIMIT and to_original - to_source >= SOURCE_MARGIN


@dataclass(frozen=True, eq=False)
class OriginalFace:
    """A face the judge found in an original frame: where, and who it is."""

    rectangle: dlib.rectangle
    descriptor: np.ndarray


@dataclass(frozen=True)
class FaceVerdict:
    """The judge's view of one original face, at the same place in the swapped frame."""

    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the frame; may reach past its edge
    to_source: float
    to_original: float

    @property
    def carries_source(self) -> bool:
        return carries_source(self.to_source, self.to_original)

    def cut_by_edge(self, width: int, height: int) -> bool:
        left, top, right, bottom = self.box
        return left < 0 or top < 0 or right > width or bottom > height


def original_faces(judge: IdentityJudge, frame: np.ndarray) -> list[OriginalFace]:
    return [
        OriginalFace(rectangle=rectangle, descriptor=judge.descriptor_in(frame, rectangle))
        for rectangle in judge.face_rectangles(frame)
    ]


def judge_swapped_faces(
    judge: IdentityJudge, originals: list[OriginalFace], swapped: np.ndarray, source_descriptor: np.ndarray
) -> list[FaceVerdict]:
    """One verdict per face found in the original frame, so a face the swap missed or destroyed counts."""
    verdicts = []
    for face in originals:
        rectangle = face.rectangle
        found = judge.descriptor_in(swapped, rectangle)
        verdicts.append(
            FaceVerdict(
                box=(rectangle.left(), rectangle.top(), rectangle.right(), rectangle.bottom()),
                to_source=judge.distance(found, source_descriptor),
                to_original=judge.distance(found, face.descriptor),
            )
        )
    return verdicts


def source_share(verdicts: list[FaceVerdict]) -> float:
    """The share of the original frames' faces that carry the source identity; 0 when there are none."""
    return sum(verdict.carries_source for verdict in verdicts) / len(verdicts) if verdicts else 0.0

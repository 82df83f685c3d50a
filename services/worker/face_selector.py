"""Which detected faces of a frame get swapped: the largest, all, or those like a reference face."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.common.face_types import DetectedFace
from services.common.job_vocabulary import SelectorMode
from services.worker.face_embedder import SAME_FACE_DISTANCE, descriptor_distance, face_descriptor


@dataclass(frozen=True)
class FaceSelection:
    mode: SelectorMode
    # Descriptor of the reference face (face_embedder), required in "reference" mode.
    reference: np.ndarray | None = None
    threshold: float = SAME_FACE_DISTANCE

    def __post_init__(self) -> None:
        if self.mode == "reference" and self.reference is None:
            raise InvalidArgument("the reference selector needs a reference face")


def largest_face(faces: Sequence[DetectedFace]) -> DetectedFace | None:
    return max(faces, key=lambda face: face.area, default=None)


def select_faces(frame: np.ndarray, faces: Sequence[DetectedFace], selection: FaceSelection) -> list[DetectedFace]:
    """The faces of `frame` to swap, in detection order; descriptors are computed only for "reference"."""
    if selection.mode == "many":
        return list(faces)
    if selection.mode == "one":
        largest = largest_face(faces)
        return [] if largest is None else [largest]
    reference = selection.reference
    if reference is None:
        raise InvalidArgument("the reference selector needs a reference face")
    chosen = []
    for face in faces:
        try:
            descriptor = face_descriptor(frame, face.landmarks)
        except ValueError:
            continue
        if descriptor_distance(reference, descriptor) < selection.threshold:
            chosen.append(face)
    return chosen

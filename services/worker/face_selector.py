"""Which detected faces of a frame get swapped: the largest, all, or those like a reference face.

"Like" is judged by ArcFace where the imported recogniser is served (arcface_embedder), and otherwise by
the classical descriptor (face_embedder), which needs no weights.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.common.face_geometry import CropLayout
from services.common.face_types import DetectedFace
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import describe_frames, nv12_to_rgb
from services.common.job_vocabulary import SelectorMode
from services.worker.arcface_embedder import ArcFaceEmbedder, identity_distance, unit_length
from services.worker.face_aligner import align_face
from services.worker.face_embedder import SAME_FACE_DISTANCE, descriptor_distance, face_descriptor


@dataclass(frozen=True)
class FaceSelection:
    mode: SelectorMode
    # Descriptor of the reference face (face_embedder), required in "reference" mode; with `arcface`, its
    # unit-length ArcFace embedding instead, compared by arcface_embedder.identity_distance.
    reference: np.ndarray | None = None
    threshold: float = SAME_FACE_DISTANCE
    arcface: ArcFaceEmbedder | None = None

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


def _faces_cut(
    frames: Frames, faces: list[list[DetectedFace]], layout: CropLayout
) -> tuple[list[tuple[int, DetectedFace]], np.ndarray]:
    """Each face that aligns, with its frame's slot, and its crop on `layout`."""
    placed: list[tuple[int, DetectedFace]] = []
    crops: list[np.ndarray] = []
    for slot, (frame, frame_faces) in enumerate(zip(frames, faces, strict=True)):
        for face in frame_faces:
            try:
                crops.append(align_face(frame, face.landmarks, layout.size, layout.template).crop)
            except ValueError:
                continue
            placed.append((slot, face))
    size = layout.size
    return placed, np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


def _select_each(frames: Frames, faces: list[list[DetectedFace]], selection: FaceSelection) -> list[list[DetectedFace]]:
    return [select_faces(frame, frame_faces, selection) for frame, frame_faces in zip(frames, faces, strict=True)]


async def select_batch(
    frames: Frames, faces: list[list[DetectedFace]], selection: FaceSelection
) -> list[list[DetectedFace]]:
    """select_faces over a batch; by ArcFace, the batch's faces go to the recogniser in one request."""
    embedder, reference = selection.arcface, selection.reference
    if selection.mode == "reference" and len(frames) and describe_frames(frames)[0] == "nv12":
        # Faces are compared on the host, in RGB.
        frames = await asyncio.to_thread(nv12_to_rgb, frames)
    if selection.mode != "reference" or embedder is None or reference is None:
        return await asyncio.to_thread(_select_each, frames, faces, selection)
    placed, crops = await asyncio.to_thread(_faces_cut, frames, faces, embedder.layout)
    distances = identity_distance(reference, unit_length(await embedder.embeddings(crops)))
    chosen: list[list[DetectedFace]] = [[] for _ in faces]
    for (slot, face), distance in zip(placed, distances, strict=True):
        if distance < selection.threshold:
            chosen[slot].append(face)
    return chosen

"""The job's source identity and reference face, prepared from their image bytes once per job."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from services.common.errors import InvalidArgument
from services.common.face_types import DetectedFace
from services.common.image_codec import decode_rgb_image
from services.worker.arcface_embedder import ArcFaceEmbedder, unit_length
from services.worker.chunk_pipeline import FaceFinder
from services.worker.face_aligner import align_face
from services.worker.face_embedder import face_descriptor
from services.worker.face_selector import largest_face
from services.worker.face_swapper import FaceSwapper, SourceIdentity

JobFaceKind = Literal["source", "reference"]
DEFAULT_CACHED_JOBS = 16

ValueT = TypeVar("ValueT")


async def find_main_face(image: np.ndarray, finder: FaceFinder, what: str) -> DetectedFace:
    faces = await finder.detect(image[None])
    face = largest_face(faces[0]) if faces else None
    if face is None:
        raise InvalidArgument(f"no face was found in the {what} image")
    return face


async def prepare_source_identity(data: bytes, finder: FaceFinder, swapper: FaceSwapper) -> SourceIdentity:
    image = decode_rgb_image(data, "source image")
    face = await find_main_face(image, finder, "source")
    try:
        layout = swapper.source_layout
        aligned = align_face(image, face.landmarks, layout.size, layout.template)
    except ValueError as error:
        raise InvalidArgument(f"the source image's face cannot be aligned: {error}") from error
    return await swapper.prepare_source(aligned.crop)


@dataclass(frozen=True)
class ReferenceFace:
    """The face to replace, described as the job's chunks will compare faces with it."""

    descriptor: np.ndarray
    # Set: `descriptor` is its unit-length ArcFace embedding (the recogniser was served when the job began).
    by_arcface: bool


async def prepare_reference(data: bytes, finder: FaceFinder, arcface: ArcFaceEmbedder | None) -> ReferenceFace:
    """The reference face's ArcFace embedding where `arcface` is given, else its classical descriptor."""
    image = decode_rgb_image(data, "reference image")
    face = await find_main_face(image, finder, "reference")
    try:
        if arcface is None:
            return ReferenceFace(face_descriptor(image, face.landmarks), by_arcface=False)
        layout = arcface.layout
        crop = align_face(image, face.landmarks, layout.size, layout.template).crop
    except ValueError as error:
        raise InvalidArgument(f"the reference image's face cannot be aligned: {error}") from error
    return ReferenceFace(unit_length(await arcface.embeddings(crop[None]))[0], by_arcface=True)


class JobFaceCache:
    """A small LRU of per-job prepared faces, so the chunks of one job detect and prepare them once."""

    def __init__(self, capacity: int = DEFAULT_CACHED_JOBS) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, JobFaceKind], object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def _get(self, job_id: str, kind: JobFaceKind, prepare: Callable[[], Awaitable[ValueT]]) -> ValueT:
        key = (job_id, kind)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]  # type: ignore[return-value]
        value = await prepare()
        self._entries[key] = value
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return value

    async def source_identity(
        self, job_id: str, data: bytes, finder: FaceFinder, swapper: FaceSwapper
    ) -> SourceIdentity:
        return await self._get(job_id, "source", lambda: prepare_source_identity(data, finder, swapper))

    async def reference(
        self, job_id: str, data: bytes, finder: FaceFinder, arcface: Callable[[], Awaitable[ArcFaceEmbedder | None]]
    ) -> ReferenceFace:
        """The job's reference face; `arcface` (asked once per job, on a miss) gives the recogniser if served."""

        async def prepare() -> ReferenceFace:
            return await prepare_reference(data, finder, await arcface())

        return await self._get(job_id, "reference", prepare)

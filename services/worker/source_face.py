"""The job's source identity and reference face, prepared from their image bytes once per job."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import numpy as np

from services.common.errors import InvalidArgument
from services.common.face_types import DetectedFace
from services.common.image_codec import decode_rgb_image
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


async def prepare_reference_descriptor(data: bytes, finder: FaceFinder) -> np.ndarray:
    image = decode_rgb_image(data, "reference image")
    face = await find_main_face(image, finder, "reference")
    try:
        return face_descriptor(image, face.landmarks)
    except ValueError as error:
        raise InvalidArgument(f"the reference image's face cannot be aligned: {error}") from error


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

    async def reference_descriptor(self, job_id: str, data: bytes, finder: FaceFinder) -> np.ndarray:
        return await self._get(job_id, "reference", lambda: prepare_reference_descriptor(data, finder))

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.face_geometry import CropLayout
from services.common.face_types import DetectedFace
from services.common.frames.frame_codec import Frames
from services.worker.arcface_embedder import ArcFaceEmbedder
from services.worker.face_aligner import alignment_matrix
from services.worker.face_swapper import SourceIdentity, SwappedFaces
from services.worker.source_face import JobFaceCache, prepare_source_identity
from tests.worker.face_photos import astronaut, astronaut_landmarks, face_from_landmarks

CROP = 128


def _png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


class _Finder:
    """Finds a small decoy face and the astronaut's real face, counting its calls."""

    def __init__(self, faces: bool = True) -> None:
        self.calls = 0
        self._faces = faces

    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        self.calls += 1
        if not self._faces:
            return [[] for _ in frames]
        decoy = face_from_landmarks(astronaut_landmarks() * 0.2)
        return [[decoy, face_from_landmarks(astronaut_landmarks())] for _ in frames]


async def _no_arcface() -> None:
    return None


class _RecordingSwapper:
    target_layout = source_layout = CropLayout(CROP)

    def __init__(self) -> None:
        self.prepared: list[np.ndarray] = []

    async def prepare_source(self, source_crop: np.ndarray) -> SourceIdentity:
        self.prepared.append(source_crop)
        return SourceIdentity(crop=source_crop)

    async def swap(self, target_crops: np.ndarray, identity: SourceIdentity) -> SwappedFaces:
        raise AssertionError("not used")


def test_source_identity_is_the_largest_face_aligned() -> None:
    swapper = _RecordingSwapper()
    identity = asyncio.run(prepare_source_identity(_png(astronaut()), _Finder(), swapper))
    assert identity.crop.shape == (CROP, CROP, 3)
    expected = cv2.warpAffine(
        astronaut(),
        alignment_matrix(astronaut_landmarks(), CROP),
        (CROP, CROP),
        borderMode=cv2.BORDER_REFLECT,
    )
    assert np.abs(identity.crop.astype(int) - expected.astype(int)).mean() < 1.0


def test_a_source_image_without_a_face_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="no face"):
        asyncio.run(prepare_source_identity(_png(astronaut()), _Finder(faces=False), _RecordingSwapper()))


def test_cache_prepares_each_job_once_and_evicts_the_oldest() -> None:
    async def scenario() -> tuple[_Finder, _RecordingSwapper, JobFaceCache]:
        cache = JobFaceCache(capacity=2)
        finder, swapper = _Finder(), _RecordingSwapper()
        data = _png(astronaut())
        first = await cache.source_identity("job-a", data, finder, swapper)
        again = await cache.source_identity("job-a", data, finder, swapper)
        assert again is first
        await cache.source_identity("job-b", data, finder, swapper)
        await cache.source_identity("job-c", data, finder, swapper)
        assert finder.calls == 3
        await cache.source_identity("job-a", data, finder, swapper)
        assert finder.calls == 4
        reference = await cache.reference("job-c", data, finder, _no_arcface)
        assert reference.descriptor.ndim == 1 and not reference.by_arcface
        return finder, swapper, cache

    finder, swapper, cache = asyncio.run(scenario())
    assert finder.calls == 5
    assert len(swapper.prepared) == 4
    assert len(cache) == 2


class _RecordingArcFace:
    def __init__(self) -> None:
        self.faces: list[np.ndarray] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.faces.append(inputs["input"])
        return {"683": np.full((len(inputs["input"]), 512), 3.0, np.float32)}

    async def output_names(self, model: str) -> tuple[str, ...]:
        return ("683",)

    async def is_model_ready(self, model: str) -> bool:
        return True


def test_a_reference_is_embedded_by_arcface_where_it_is_served() -> None:
    recogniser = _RecordingArcFace()
    arcface = ArcFaceEmbedder(recogniser, recogniser)

    async def served() -> ArcFaceEmbedder:
        return arcface

    reference = asyncio.run(JobFaceCache().reference("job-r", _png(astronaut()), _Finder(), served))

    assert reference.by_arcface
    np.testing.assert_allclose(reference.descriptor, np.full(512, 1 / np.sqrt(512), np.float32), rtol=1e-5)
    ((face,),) = recogniser.faces
    assert face.shape == (3, 112, 112)

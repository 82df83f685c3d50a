"""The chunk pipeline's stages without gRPC: decoder, detector and encoder code called in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from services.common.face_types import DetectedFace
from services.common.frame_codec import Frames
from services.decoder.frame_reader import iter_frame_batches
from services.detector.face_detector import FaceDetector
from services.encoder.segment_writer import SegmentWriter
from services.worker.stage_clients import detection_size, downscale_frames, scale_face


class LocalFrameSource:
    def __init__(self, path: Path, frame_count: int, batch_size: int) -> None:
        self._path, self._frame_count, self._batch_size = path, frame_count, batch_size

    async def __aiter__(self) -> AsyncIterator[tuple[Frames, Sequence[int]]]:
        batches = iter_frame_batches(self._path, 0, 0, self._frame_count, self._batch_size)
        while True:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                return
            frames, indices, _ = batch
            yield frames, indices


class LocalFaceFinder:
    """The detector's own code on the worker's downscaled copy, as DetectorFaceFinder sends it."""

    def __init__(self, detector: FaceDetector, max_side: int) -> None:
        self._detector, self._max_side = detector, max_side

    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        height, width = frames.shape[1:3]
        size = detection_size(width, height, self._max_side)
        small = await asyncio.to_thread(downscale_frames, frames, size)
        found = await self._detector.detect(small)
        scale_x, scale_y = width / size[0], height / size[1]
        return [[scale_face(face, scale_x, scale_y) for face in faces] for faces in found]


class LocalSegmentSink:
    def __init__(self, writer: SegmentWriter) -> None:
        self._writer = writer

    async def write(self, frames: Frames) -> None:
        await asyncio.to_thread(self._writer.write, frames)

    async def close(self) -> int:
        return await asyncio.to_thread(self._writer.close)

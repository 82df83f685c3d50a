"""The chunk pipeline's stages without gRPC: decoder, detector and encoder code called in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from services.common.face_types import DetectedFace
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import PixelFormat, describe_frames
from services.common.input_limits import DEFAULT_INPUT_LIMITS
from services.decoder.decode_backend import BackendChoice, iter_decoded_batches
from services.decoder.frame_reader import DEFAULT_MAX_BATCH_BYTES
from services.detector.face_detector import Detector
from services.encoder.segment_writer import SegmentWriter
from services.worker.face_aligner import FrameShrinker, downscale_frames
from services.worker.stage_clients import detection_size, scale_face

PYAV = BackendChoice(requested="cpu", active="cpu", reason="the in-process bench decodes with PyAV")


class LocalFrameSource:
    """A frame range decoded in this process with the decoder's own code, from frame 0 unless start_frame
    and its seek_pts are given, on the backend the decoder service would choose (PyAV unless told), in the
    pixel format a worker would ask for."""

    def __init__(
        self,
        path: Path,
        frame_count: int,
        batch_size: int,
        start_frame: int = 0,
        seek_pts: int = 0,
        backend: BackendChoice = PYAV,
        pixel_format: PixelFormat = "rgb24",
    ) -> None:
        self._path, self._frame_count, self._batch_size = path, frame_count, batch_size
        self._start_frame, self._seek_pts, self._backend = start_frame, seek_pts, backend
        self._pixel_format = pixel_format

    async def __aiter__(self) -> AsyncIterator[tuple[Frames, Sequence[int]]]:
        batches = iter_decoded_batches(
            self._backend,
            self._path,
            self._start_frame,
            self._seek_pts,
            self._frame_count,
            self._batch_size,
            DEFAULT_INPUT_LIMITS,
            DEFAULT_MAX_BATCH_BYTES,
            pixel_format=self._pixel_format,
        )
        while True:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                return
            frames, indices, _ = batch
            yield frames, indices


class LocalFaceFinder:
    """The detector's own code on the worker's downscaled copy, as DetectorFaceFinder sends it."""

    def __init__(self, detector: Detector, max_side: int, shrink: FrameShrinker = downscale_frames) -> None:
        self._detector, self._max_side, self._shrink = detector, max_side, shrink

    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        _, width, height = describe_frames(frames)
        size = detection_size(width, height, self._max_side)
        small = await asyncio.to_thread(self._shrink, frames, size)
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

"""Face detection with an imported FaceFusion detector (YOLOFace, SCRFD, RetinaFace) served by Triton.

Pre- and post-processing follow FaceFusion's public face_detector.py and face_helper.py:
- each frame is shrunk (never enlarged) to fit the 640x640 canvas keeping its aspect, placed at the
  canvas's top-left corner on black, flipped to BGR and scaled as the model's spec says (NCHW float32);
- "yolo_rows" answers per candidate a box centre and size, a score and five (x, y, confidence) points;
- "anchor_strides" answers per stride and anchor a score and distances, in units of the stride, from the
  anchor (the top-left corner of its feature-map cell, two anchors a cell) to the box's edges and to
  the five points;
- candidates at or above the score threshold go through NMS, and boxes and points are mapped back to
  frame pixels by the shrink's ratios.

Every answer is checked before it is read: a missing, empty, misshapen or non-finite output fails the
request as FailedPrecondition naming the model, never as "no face found".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
from numpy.typing import NDArray

from services.common.adaptive_batch import AdaptiveBatch
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.face_detector_models import (
    ANCHORS_PER_LOCATION,
    DEFAULT_MIN_SCORE,
    DETECTOR_CANVAS,
    DETECTOR_INPUT,
    FEATURE_STRIDES,
    LANDMARK_POINTS,
    NMS_OVERLAP,
    YOLO_CANDIDATES,
    YOLO_MAX_BATCH,
    YOLO_ROW_VALUES,
    DetectorModelSpec,
)
from services.common.face_model_catalog import fp32_twin_name
from services.common.face_types import DetectedFace
from services.common.fp32_fallback import NonFiniteOutputs, infer_with_fp32_twin
from services.common.model_runner import ModelRunner
from services.detector.box_ops import FloatArray, box_heights, box_widths, nms
from services.detector.face_detector import MAX_REQUEST_BYTES, Frames, validate_frames

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Fitted:
    """A frame's size on the canvas, and the ratios that map canvas pixels back to the frame's."""

    width: int
    height: int
    ratio_x: float
    ratio_y: float


@dataclass(frozen=True)
class Candidates:
    """One frame's faces in canvas or frame pixels: boxes (n, 4), scores (n,), landmarks (n, 5, 2)."""

    boxes: FloatArray
    scores: FloatArray
    landmarks: FloatArray

    def take(self, picked: NDArray[np.integer] | NDArray[np.bool_]) -> Candidates:
        return Candidates(self.boxes[picked], self.scores[picked], self.landmarks[picked])


def fitted_size(width: int, height: int, canvas: int = DETECTOR_CANVAS) -> Fitted:
    """FaceFusion's restrict_frame: a frame larger than the canvas shrinks to fit it, truncating to pixels."""
    if width <= canvas and height <= canvas:
        return Fitted(width, height, 1.0, 1.0)
    scale = min(canvas / height, canvas / width)
    fitted_width, fitted_height = int(width * scale), int(height * scale)
    return Fitted(fitted_width, fitted_height, width / fitted_width, height / fitted_height)


def letterbox(frame: NDArray[np.uint8], spec: DetectorModelSpec, canvas: int = DETECTOR_CANVAS) -> FloatArray:
    """An (H, W, 3) RGB frame -> the model's (3, canvas, canvas) float32 BGR input."""
    height, width = frame.shape[:2]
    fitted = fitted_size(width, height, canvas)
    shrunk = (
        frame if (fitted.width, fitted.height) == (width, height) else cv2.resize(frame, (fitted.width, fitted.height))
    )
    image = np.zeros((canvas, canvas, 3), np.float32)
    image[: fitted.height, : fitted.width] = shrunk[:, :, ::-1]
    image = (image - np.float32(spec.scaling.offset)) / np.float32(spec.scaling.divisor)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def static_anchors(stride: int, canvas: int = DETECTOR_CANVAS) -> FloatArray:
    """(cells x 2, 2) anchor points (x, y): cells row by row, each cell's corner twice (create_static_anchors)."""
    cells = canvas // stride
    rows, columns = np.mgrid[:cells, :cells]
    corners = np.stack([columns, rows], axis=-1).reshape(-1, 2) * stride
    return np.repeat(corners, ANCHORS_PER_LOCATION, axis=0).astype(np.float32)


def distances_to_boxes(anchors: FloatArray, distances: FloatArray) -> FloatArray:
    """Distances (left, top, right, bottom) from each anchor -> boxes (x1, y1, x2, y2)."""
    return np.concatenate([anchors - distances[:, 0:2], anchors + distances[:, 2:4]], axis=1)


def distances_to_landmarks(anchors: FloatArray, distances: FloatArray) -> FloatArray:
    """(n, 10) offsets (x1, y1, ..., x5, y5) from each anchor -> (n, 5, 2) points."""
    return anchors[:, None, :] + distances.reshape(-1, LANDMARK_POINTS, 2)


def anchor_stride_rows(stride: int, canvas: int = DETECTOR_CANVAS) -> int:
    return (canvas // stride) ** 2 * ANCHORS_PER_LOCATION


def decode_yolo_rows(columns: FloatArray, min_score: float) -> Candidates:
    """One frame's (20, candidates) output -> its candidates scoring at least min_score, in canvas pixels."""
    rows = columns.T
    kept = rows[rows[:, 4] >= min_score]
    centres, sizes = kept[:, 0:2], kept[:, 2:4]
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    points = kept[:, 5:].reshape(-1, LANDMARK_POINTS, 3)[:, :, :2]
    return Candidates(boxes.astype(np.float32), kept[:, 4].astype(np.float32), points.astype(np.float32))


def decode_anchor_strides(outputs: Sequence[FloatArray], min_score: float, canvas: int = DETECTOR_CANVAS) -> Candidates:
    """One frame's nine outputs (scores, boxes, landmarks of strides 8, 16, 32) -> candidates in canvas pixels."""
    strides = len(FEATURE_STRIDES)
    parts = []
    for index, stride in enumerate(FEATURE_STRIDES):
        scores = outputs[index][:, 0]
        kept = scores >= min_score
        anchors = static_anchors(stride, canvas)[kept]
        boxes = distances_to_boxes(anchors, outputs[index + strides][kept] * stride)
        landmarks = distances_to_landmarks(anchors, outputs[index + 2 * strides][kept] * stride)
        parts.append(Candidates(boxes, scores[kept], landmarks))
    return Candidates(
        np.concatenate([part.boxes for part in parts]).astype(np.float32),
        np.concatenate([part.scores for part in parts]).astype(np.float32),
        np.concatenate([part.landmarks for part in parts]).astype(np.float32),
    )


def to_frame(candidates: Candidates, fitted: Fitted) -> Candidates:
    ratios = np.array([fitted.ratio_x, fitted.ratio_y], np.float32)
    return Candidates(candidates.boxes * np.tile(ratios, 2), candidates.scores, candidates.landmarks * ratios)


def frame_faces(candidates: Candidates, width: int, height: int, min_face_size: int) -> list[DetectedFace]:
    """NMS over one frame's candidates (in frame pixels), faces whose box's shorter side is below
    min_face_size dropped; best score first, boxes clipped to the frame (landmarks are not)."""
    best_first = candidates.take(nms(candidates.boxes, candidates.scores, NMS_OVERLAP))
    sides = np.minimum(box_widths(best_first.boxes), box_heights(best_first.boxes))
    faces = best_first.take(sides >= min_face_size)
    boxes = np.clip(faces.boxes, 0.0, np.array([width, height, width, height], np.float32))
    return [
        DetectedFace(box=(float(x1), float(y1), float(x2), float(y2)), score=float(score), landmarks=points)
        for (x1, y1, x2, y2), score, points in zip(boxes, faces.scores, faces.landmarks, strict=True)
    ]


@dataclass
class FallbackTally:
    """Requests one DetectRequest ran again on an FP32 twin; the servicer reports it to the worker."""

    count: int = 0


# The tally of the request being served: set by the servicer, so the Detector protocol stays as it is.
REQUEST_FALLBACKS: ContextVar[FallbackTally | None] = ContextVar("detector_fp32_fallbacks", default=None)


async def with_fp32_fallback(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    runner: ModelRunner,
    decode: Callable[[Mapping[str, np.ndarray | None]], ResultT],
) -> ResultT:
    """`decode` of the model's answer, off the event loop, or of its FP32 twin's where it holds NaN or Inf
    (fp32_fallback; counted in the request's tally)."""

    async def read(_: str, answer: Mapping[str, np.ndarray]) -> ResultT:
        return await asyncio.to_thread(decode, answer)

    result, on_twin = await infer_with_fp32_twin(runner, model, fp32_twin_name(model), inputs, outputs, read)
    tally = REQUEST_FALLBACKS.get()
    if on_twin and tally is not None:
        tally.count += 1
    return result


def check_yolo_output(model: str, output: np.ndarray | None, count: int) -> FloatArray:
    expected = (count, YOLO_ROW_VALUES, YOLO_CANDIDATES)
    if output is None or output.shape != expected:
        shape = "nothing" if output is None else f"shape {output.shape}"
        raise FailedPrecondition(f"model {model} returned {shape} for {count} frames; expected {expected}")
    if not np.isfinite(output).all():
        raise NonFiniteOutputs(f"model {model} returned NaN or infinite values")
    return output.astype(np.float32, copy=False)


def check_anchor_stride_outputs(model: str, outputs: Sequence[np.ndarray | None]) -> list[FloatArray]:
    strides = len(FEATURE_STRIDES)
    checked = []
    for index, output in enumerate(outputs):
        values = (1, 4, 2 * LANDMARK_POINTS)[index // strides]
        expected = (anchor_stride_rows(FEATURE_STRIDES[index % strides]), values)
        if output is None or output.shape != expected:
            shape = "nothing" if output is None else f"shape {output.shape}"
            raise FailedPrecondition(f"model {model} returned {shape} as output {index}; expected {expected}")
        if not np.isfinite(output).all():
            raise NonFiniteOutputs(f"model {model} returned NaN or infinite values in output {index}")
        checked.append(output.astype(np.float32, copy=False))
    return checked


class ImportedFaceDetector:
    """The Detector protocol over an imported detector model; `output_names` are the model's outputs in
    its order (Triton's config of it), since FaceFusion's files name them only by position."""

    def __init__(self, runner: ModelRunner, spec: DetectorModelSpec, output_names: Sequence[str]) -> None:
        if len(output_names) != spec.output_count:
            raise FailedPrecondition(
                f"model {spec.name} serves {len(output_names)} outputs; "
                f"its {spec.layout} layout has {spec.output_count}"
            )
        self.runner = runner
        self.spec = spec
        self.output_names = tuple(output_names)
        # YOLOFace batches frames; SCRFD and RetinaFace take one frame a request, sent concurrently.
        self._yolo_batches = AdaptiveBatch(spec.name, YOLO_MAX_BATCH)

    async def detect(
        self, frames: Frames, min_face_size: int | None = None, min_score: float | None = None
    ) -> list[list[DetectedFace]]:
        """Faces of every frame of an (N, H, W, 3) uint8 RGB batch, best score first per frame."""
        validate_frames(frames)
        score = DEFAULT_MIN_SCORE if min_score is None else min_score
        face_size = 0 if min_face_size is None else min_face_size
        if face_size < 0:
            raise InvalidArgument(f"min_face_size {face_size} is negative")
        if not 0.0 <= score <= 1.0:
            raise InvalidArgument(f"min_score {score} is outside 0..1")
        count, height, width = frames.shape[:3]
        if count == 0:
            return []
        if self.spec.layout == "yolo_rows":
            per_frame = await self._yolo(frames, score)
        else:
            per_frame = await asyncio.gather(*(self._anchor_strides(frame, score) for frame in frames))
        fitted = fitted_size(width, height)

        def faces() -> list[list[DetectedFace]]:
            return [frame_faces(to_frame(candidates, fitted), width, height, face_size) for candidates in per_frame]

        return await asyncio.to_thread(faces)

    async def _yolo(self, frames: Frames, min_score: float) -> list[Candidates]:
        (output_name,) = self.output_names

        def canvases(part: slice) -> np.ndarray:
            return np.stack([letterbox(frame, self.spec) for frame in frames[part]])

        # Fitting frames and decoding answers is numpy work: off the event loop, which serves other requests.
        async def infer(part: slice) -> list[Candidates]:
            images = await asyncio.to_thread(canvases, part)

            def decoded(answer: Mapping[str, np.ndarray | None]) -> list[Candidates]:
                checked = check_yolo_output(self.spec.name, answer.get(output_name), len(images))
                return [decode_yolo_rows(columns, min_score) for columns in checked]

            inputs = {DETECTOR_INPUT: images}
            return await with_fp32_fallback(self.spec.name, inputs, self.output_names, self.runner, decoded)

        canvas_bytes = 3 * DETECTOR_CANVAS * DETECTOR_CANVAS * np.dtype(np.float32).itemsize
        parts = await self._yolo_batches.run(len(frames), infer, max(1, MAX_REQUEST_BYTES // canvas_bytes))
        return [candidates for part in parts for candidates in part]

    async def _anchor_strides(self, frame: NDArray[np.uint8], min_score: float) -> Candidates:
        image = (await asyncio.to_thread(letterbox, frame, self.spec))[None]

        def decoded(answer: Mapping[str, np.ndarray | None]) -> Candidates:
            outputs = check_anchor_stride_outputs(self.spec.name, [answer.get(name) for name in self.output_names])
            return decode_anchor_strides(outputs, min_score)

        inputs = {DETECTOR_INPUT: image}
        return await with_fp32_fallback(self.spec.name, inputs, self.output_names, self.runner, decoded)

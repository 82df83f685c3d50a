"""MTCNN face detection over a batch of frames: per stage (FaceDetector) or as one model (CascadeFaceDetector).

The cascade follows the original MTCNN (Zhang et al. 2016): P-Net proposes boxes on an image
pyramid, R-Net rescores and refines 24x24 crops of them, O-Net rescores 48x48 crops and adds five
landmarks.

FaceDetector sends the three networks to a ModelRunner and does the rest on the CPU. GPU work is
batched across the whole frame batch: one P-Net request per pyramid level holding every frame (all
levels in flight at once so the server's batcher and this process's CPU overlap), then one R-Net and
one O-Net request holding every candidate of every frame, split only at the models' max_batch_size.
Everything between the requests is vectorised numpy over all frames, with the frame index carried
beside each candidate.

CascadeFaceDetector sends the frames to one model, mtcnn_cascade (services/model_build/mtcnn_cascade.py),
that runs the same steps as tensor work on the GPU: the CPU's pyramid, NMS and crops (35 ms a frame
on the GPU machine) leave the hot loop. The model answers padded per-frame arrays (CASCADE_OUTPUTS),
which become the same DetectedFace lists.

Decisions where the original leaves room:
- Boxes are continuous pixel coordinates (width = x2 - x1), not MATLAB's inclusive indices.
- R-Net and O-Net crops are zero-padded where a box leaves the frame, as in the original, and are
  taken from the smallest pyramid level that still has the crop's resolution (box_ops.pyramid_crops):
  INTER_AREA from a 300-pixel box costs several times more than from a 34-pixel one.
- Regression and landmarks are applied to the box a crop really covered after snapping to pixels.

Every answer is checked against the layout this code reads before it is used: a model that answers
with too few rows, other channels or non-finite values fails the request as FailedPrecondition naming
the model, rather than as "no face found" or an indexing error further on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from services.common.adaptive_batch import AdaptiveBatch
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.face_types import DetectedFace
from services.common.model_runner import ModelRunner
from services.detector.box_ops import (
    PNET_CELL_SIZE,
    FloatArray,
    IndexArray,
    NmsMode,
    apply_regression,
    box_heights,
    box_widths,
    grid_boxes,
    nms,
    pyramid_crops,
    pyramid_scales,
    square_boxes,
)

PNET_MODEL = "mtcnn_pnet"
RNET_MODEL = "mtcnn_rnet"
ONET_MODEL = "mtcnn_onet"
CASCADE_MODEL = "mtcnn_cascade"
INPUT_NAME = "image"
PROBABILITY = "probability"
REGRESSION = "regression"
LANDMARKS = "landmarks"

# mtcnn_cascade's tensors (triton_models/mtcnn_cascade/config.pbtxt): frames (n, H, W, 3) uint8 and
# options (n, len(CASCADE_OPTIONS)) float32 in; per frame, the MAX_FACES best faces out, zero-padded:
# boxes (n, K, 4), scores (n, K), landmarks (n, K, 5, 2) and counts (n, 1), the rows that are faces.
FRAMES = "frames"
OPTIONS = "options"
BOXES = "boxes"
SCORES = "scores"
COUNTS = "counts"
CASCADE_OUTPUTS = (BOXES, SCORES, LANDMARKS, COUNTS)
MAX_FACES = 32

# max_batch_size of triton_models/mtcnn_*/config.pbtxt; a request above it is refused by Triton.
PNET_MAX_BATCH = 32
RNET_MAX_BATCH = 1024
ONET_MAX_BATCH = 512
CASCADE_MAX_BATCH = 64
# A request of many large frames is split further to stay well inside gRPC's message limit.
MAX_REQUEST_BYTES = 64 * 1024 * 1024

RNET_SIDE = 24
ONET_SIDE = 48

# Channels of each output: face / not-face scores, box offsets (x1, y1, x2, y2), five (x, y) landmarks.
OUTPUT_CHANNELS = {PROBABILITY: 2, REGRESSION: 4, LANDMARKS: 10}

# Overlap thresholds of the original MTCNN: within one pyramid level, across levels, after R-Net,
# and after O-Net, where 'min' also removes a small box lying inside a bigger face's box.
PNET_LEVEL_NMS = 0.5
PNET_MERGED_NMS = 0.7
RNET_NMS = 0.7
ONET_NMS = 0.7
ONET_NMS_MODE: NmsMode = "min"

Frames = NDArray[np.uint8]


@dataclass(frozen=True)
class DetectionDefaults:
    """Cascade thresholds; min_face_size and min_score are what a request may override.

    min_face_size is 40 rather than MTCNN's customary 20: on the worker's 640-pixel detection copy
    that is about 6% of the frame width, and each halving of it more than doubles P-Net's work for
    faces too small to swap well anyway.
    """

    min_face_size: int = 40
    pnet_score: float = 0.6
    rnet_score: float = 0.7
    min_score: float = 0.7
    scale_factor: float = 0.709

    def __post_init__(self) -> None:
        if self.min_face_size <= 0:
            raise InvalidArgument(f"min_face_size {self.min_face_size} is not positive")
        for name in ("pnet_score", "rnet_score", "min_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidArgument(f"{name} {value} is outside 0..1")
        if not 0.0 < self.scale_factor < 1.0:
            raise InvalidArgument(f"scale_factor {self.scale_factor} is outside (0, 1)")


# The columns of mtcnn_cascade's options input: every threshold of the cascade, per frame.
CASCADE_OPTIONS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(DetectionDefaults))


@dataclass(frozen=True)
class Candidates:
    """Boxes of every frame in one set of arrays; frame_index says which frame each belongs to."""

    frame_index: IndexArray
    boxes: FloatArray
    scores: FloatArray

    def __len__(self) -> int:
        return len(self.boxes)

    def take(self, picked: NDArray[np.integer] | NDArray[np.bool_]) -> Candidates:
        return Candidates(self.frame_index[picked], self.boxes[picked], self.scores[picked])

    def with_boxes(self, boxes: FloatArray) -> Candidates:
        return Candidates(self.frame_index, boxes, self.scores)

    def suppress_indices(self, threshold: float, mode: NmsMode = "union") -> IndexArray:
        """Indices surviving per-frame NMS, best score first."""
        return nms(self.boxes, self.scores, threshold, mode, groups=self.frame_index)

    def non_empty(self) -> Candidates:
        return self.take((box_widths(self.boxes) >= 1) & (box_heights(self.boxes) >= 1))


def no_candidates() -> Candidates:
    return Candidates(np.zeros(0, np.intp), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))


def concat_candidates(parts: Sequence[Candidates]) -> Candidates:
    if not parts:
        return no_candidates()
    return Candidates(
        np.concatenate([part.frame_index for part in parts]),
        np.concatenate([part.boxes for part in parts]),
        np.concatenate([part.scores for part in parts]),
    )


def to_network_input(images: Frames) -> FloatArray:
    """(n, h, w, 3) uint8 RGB -> (n, 3, h, w) float32, the raw 0..255 layout every stage takes."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


def resize_frames(frames: Frames, width: int, height: int) -> Frames:
    return np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in frames])


def relative_landmarks_to_pixels(boxes: FloatArray, relative: FloatArray) -> NDArray[np.float32]:
    """O-Net's (n, 10) output (x1..x5, y1..y5 as fractions of the box) -> (n, 5, 2) pixels."""
    xs = boxes[:, 0:1] + box_widths(boxes)[:, None] * relative[:, 0:5]
    ys = boxes[:, 1:2] + box_heights(boxes)[:, None] * relative[:, 5:10]
    return np.stack([xs, ys], axis=2).astype(np.float32)


def check_model_outputs(model: str, outputs: Mapping[str, np.ndarray | None], names: Sequence[str], count: int) -> None:
    """Each output present with `count` rows of its channels: (count, C, h, w) for P-Net's map, (count, C) else."""
    grid_sizes = set()
    for name in names:
        array = outputs.get(name)
        if array is None:
            raise FailedPrecondition(f"model {model} returned no {name!r} output")
        channels = OUTPUT_CHANNELS[name]
        rank = 4 if model == PNET_MODEL else 2
        if array.ndim != rank or array.shape[0] != count or array.shape[1] != channels:
            expected = f"({count}, {channels}{', h, w' if rank == 4 else ''})"
            raise FailedPrecondition(
                f"model {model} returned {name!r} of shape {array.shape} for {count} images; expected {expected}"
            )
        grid_sizes.add(array.shape[2:])
    if len(grid_sizes) > 1:
        raise FailedPrecondition(f"model {model} returned outputs of different grid sizes {sorted(grid_sizes)}")


def validate_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise InvalidArgument(f"frames must be (count, height, width, 3) RGB, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise InvalidArgument(f"frames must be uint8, got {frames.dtype}")


def request_thresholds(
    defaults: DetectionDefaults, min_face_size: int | None, min_score: float | None
) -> DetectionDefaults:
    """The defaults with a request's overrides, checked; min_face_size below 12 (P-Net's window) becomes 12."""
    face_size = defaults.min_face_size if min_face_size is None else min_face_size
    score = defaults.min_score if min_score is None else min_score
    if face_size <= 0:
        raise InvalidArgument(f"min_face_size {face_size} is not positive")
    if not 0.0 <= score <= 1.0:
        raise InvalidArgument(f"min_score {score} is outside 0..1")
    # Faces smaller than P-Net's window would need the frames upscaled, at quadratic cost, for
    # faces too small to swap well; callers that scale a full-frame minimum down may ask for them.
    return dataclasses.replace(defaults, min_face_size=max(face_size, PNET_CELL_SIZE), min_score=score)


def has_pyramid(frames: Frames, thresholds: DetectionDefaults) -> bool:
    """Whether the frames are at least one P-Net window across at the smallest face size asked for."""
    height, width = frames.shape[1:3]
    return bool(pyramid_scales(min(height, width), thresholds.min_face_size, thresholds.scale_factor))


class Detector(Protocol):
    async def detect(
        self, frames: Frames, min_face_size: int | None = None, min_score: float | None = None
    ) -> list[list[DetectedFace]]: ...


class FaceDetector:
    def __init__(self, runner: ModelRunner, defaults: DetectionDefaults | None = None) -> None:
        self.runner = runner
        self.defaults = defaults or DetectionDefaults()
        self._batches = {
            model: AdaptiveBatch(model, limit)
            for model, limit in (
                (PNET_MODEL, PNET_MAX_BATCH),
                (RNET_MODEL, RNET_MAX_BATCH),
                (ONET_MODEL, ONET_MAX_BATCH),
            )
        }

    async def detect(
        self, frames: Frames, min_face_size: int | None = None, min_score: float | None = None
    ) -> list[list[DetectedFace]]:
        """Faces of every frame of an (N, H, W, 3) uint8 RGB batch, best score first per frame.

        Boxes are clipped to the frame; landmarks are not, so a face at the border keeps its true
        eye and mouth positions. min_face_size below 12 (P-Net's window) is treated as 12.
        """
        validate_frames(frames)
        frames = np.ascontiguousarray(frames)
        thresholds = request_thresholds(self.defaults, min_face_size, min_score)
        count, height, width = frames.shape[:3]
        if count == 0:
            return []
        levels, candidates = await self._propose(frames, thresholds.min_face_size)
        candidates = await self._refine(levels, candidates)
        candidates, landmarks = await self._output(levels, candidates, thresholds.min_score)
        return self._per_frame(count, width, height, candidates, landmarks)

    async def _propose(self, frames: Frames, min_face_size: int) -> tuple[list[Frames], Candidates]:
        """P-Net over the pyramid; returns the pyramid (frames first) and squared, regressed candidates."""
        height, width = frames.shape[1:3]
        scales = pyramid_scales(min(height, width), min_face_size, self.defaults.scale_factor)
        if not scales:
            return [frames], no_candidates()
        # Every smaller level is resized from the first one: INTER_AREA from the full frame costs
        # several times more and gives nearly the same pixels.
        first = resize_frames(frames, math.ceil(width * scales[0]), math.ceil(height * scales[0]))
        results = await asyncio.gather(*(self._propose_level(first, width, height, scale) for scale in scales))
        merged = concat_candidates([candidates for _, candidates, _ in results])
        offsets = np.concatenate([level_offsets for _, _, level_offsets in results])
        kept = merged.suppress_indices(PNET_MERGED_NMS)
        refined = square_boxes(apply_regression(merged.boxes[kept], offsets[kept]))
        levels = [frames, *(level for level, _, _ in results)]
        return levels, merged.take(kept).with_boxes(refined).non_empty()

    async def _propose_level(
        self, first: Frames, width: int, height: int, scale: float
    ) -> tuple[Frames, Candidates, FloatArray]:
        """One pyramid level's images, its candidates (still unregressed) and their regression offsets."""
        level_width, level_height = math.ceil(width * scale), math.ceil(height * scale)
        if first.shape[1:3] == (level_height, level_width):
            level = first
        else:
            level = resize_frames(first, level_width, level_height)
        images = to_network_input(level)
        frames_per_request = max(1, MAX_REQUEST_BYTES // images[0].nbytes)
        outputs = await self._infer_chunked(PNET_MODEL, images, (PROBABILITY, REGRESSION), frames_per_request)
        frame_index, boxes, scores, offsets = grid_boxes(
            outputs[PROBABILITY][:, 1], outputs[REGRESSION], scale, self.defaults.pnet_score
        )
        candidates = Candidates(frame_index, boxes, scores)
        kept = candidates.suppress_indices(PNET_LEVEL_NMS)
        return level, candidates.take(kept), offsets[kept]

    async def _refine(self, levels: Sequence[Frames], candidates: Candidates) -> Candidates:
        """R-Net: drops candidates scoring below rnet_score, regresses and squares the rest."""
        if not len(candidates):
            return candidates
        crops, cropped = pyramid_crops(levels, candidates.frame_index, candidates.boxes, RNET_SIDE)
        outputs = await self._infer_chunked(RNET_MODEL, to_network_input(crops), (PROBABILITY, REGRESSION))
        scores = outputs[PROBABILITY][:, 1].astype(np.float32)
        passed = scores >= self.defaults.rnet_score
        rescored = Candidates(candidates.frame_index[passed], cropped[passed], scores[passed])
        kept = rescored.suppress_indices(RNET_NMS)
        refined = square_boxes(apply_regression(rescored.boxes[kept], outputs[REGRESSION][passed][kept]))
        return rescored.take(kept).with_boxes(refined).non_empty()

    async def _output(
        self, levels: Sequence[Frames], candidates: Candidates, min_score: float
    ) -> tuple[Candidates, NDArray[np.float32]]:
        """O-Net: final scores, boxes and landmarks; (n, 5, 2) landmarks beside the candidates."""
        if not len(candidates):
            return candidates, np.zeros((0, 5, 2), np.float32)
        crops, cropped = pyramid_crops(levels, candidates.frame_index, candidates.boxes, ONET_SIDE)
        outputs = await self._infer_chunked(ONET_MODEL, to_network_input(crops), (PROBABILITY, REGRESSION, LANDMARKS))
        scores = outputs[PROBABILITY][:, 1].astype(np.float32)
        passed = scores >= min_score
        landmarks = relative_landmarks_to_pixels(cropped[passed], outputs[LANDMARKS][passed])
        final = Candidates(
            candidates.frame_index[passed],
            apply_regression(cropped[passed], outputs[REGRESSION][passed]),
            scores[passed],
        )
        kept = final.suppress_indices(ONET_NMS, ONET_NMS_MODE)
        return final.take(kept), landmarks[kept]

    async def _infer_chunked(
        self, model: str, images: FloatArray, outputs: Sequence[str], most: int | None = None
    ) -> dict[str, np.ndarray]:
        """The model over `images` in requests of at most `most` and the model's batch limit, which shrinks
        when the model runs out of memory."""

        async def infer(part: slice) -> dict[str, np.ndarray]:
            result = await self.runner.infer(model, {INPUT_NAME: images[part]}, outputs)
            check_model_outputs(model, result, outputs, len(images[part]))
            return result

        results = await self._batches[model].run(len(images), infer, most)
        if len(results) == 1:
            return results[0]
        return {name: np.concatenate([result[name] for result in results]) for name in outputs}

    @staticmethod
    def _per_frame(
        count: int, width: int, height: int, candidates: Candidates, landmarks: NDArray[np.float32]
    ) -> list[list[DetectedFace]]:
        limits = np.array([width, height, width, height], np.float32)
        clipped = np.clip(candidates.boxes, 0.0, limits)
        faces: list[list[DetectedFace]] = [[] for _ in range(count)]
        # nms returns best-first, so appending in candidate order keeps each frame sorted by score.
        for index, box, score, points in zip(
            candidates.frame_index, clipped, candidates.scores, landmarks, strict=True
        ):
            x1, y1, x2, y2 = (float(v) for v in box)
            faces[int(index)].append(
                DetectedFace(box=(x1, y1, x2, y2), score=float(score), landmarks=points.astype(np.float32))
            )
        return faces


def check_cascade_outputs(model: str, outputs: Mapping[str, np.ndarray | None], count: int) -> dict[str, np.ndarray]:
    """The cascade's four outputs for `count` frames, laid out as CASCADE_OUTPUTS says, with finite faces.

    Anything else (an output missing or empty, shapes that disagree, counts outside 0..K, NaN or
    infinite values in a counted row) fails as FailedPrecondition naming the model.
    """
    arrays = {}
    for name in CASCADE_OUTPUTS:
        array = outputs.get(name)
        if array is None:
            raise FailedPrecondition(f"model {model} returned no {name!r} output")
        arrays[name] = array
    boxes = arrays[BOXES]
    if boxes.ndim != 3 or boxes.shape[0] != count or boxes.shape[1] == 0 or boxes.shape[2] != 4:
        raise FailedPrecondition(
            f"model {model} returned {BOXES!r} of shape {boxes.shape} for {count} frames; expected ({count}, K, 4)"
        )
    limit = boxes.shape[1]
    expected = {SCORES: (count, limit), LANDMARKS: (count, limit, 5, 2), COUNTS: (count, 1)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise FailedPrecondition(
                f"model {model} returned {name!r} of shape {arrays[name].shape} for {count} frames; expected {shape}"
            )
    counts = arrays[COUNTS]
    if not np.issubdtype(counts.dtype, np.integer):
        raise FailedPrecondition(f"model {model} returned {COUNTS!r} of type {counts.dtype}; expected integers")
    if counts.size and (counts.min() < 0 or counts.max() > limit):
        raise FailedPrecondition(f"model {model} returned face counts outside 0..{limit}: {counts.ravel().tolist()}")
    present = np.arange(limit)[None, :] < counts
    for name in (BOXES, SCORES, LANDMARKS):
        if not np.isfinite(arrays[name][present]).all():
            raise FailedPrecondition(f"model {model} returned NaN or infinite {name!r} for a counted face")
    return arrays


def faces_from_cascade(outputs: Mapping[str, np.ndarray]) -> list[list[DetectedFace]]:
    """Checked cascade outputs -> each frame's faces, in the model's order (best score first)."""
    faces: list[list[DetectedFace]] = []
    for boxes, scores, landmarks, (count,) in zip(
        outputs[BOXES], outputs[SCORES], outputs[LANDMARKS], outputs[COUNTS], strict=True
    ):
        faces.append(
            [
                DetectedFace(
                    box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                    score=float(score),
                    landmarks=np.array(points, np.float32),
                )
                for box, score, points in zip(boxes[:count], scores[:count], landmarks[:count], strict=True)
            ]
        )
    return faces


class CascadeFaceDetector:
    """FaceDetector's answers from one mtcnn_cascade request per batch (split at CASCADE_MAX_BATCH, halved
    while the model runs out of memory)."""

    def __init__(
        self, runner: ModelRunner, defaults: DetectionDefaults | None = None, model: str = CASCADE_MODEL
    ) -> None:
        self.runner = runner
        self.defaults = defaults or DetectionDefaults()
        self.model = model
        self._batches = AdaptiveBatch(model, CASCADE_MAX_BATCH)

    async def detect(
        self, frames: Frames, min_face_size: int | None = None, min_score: float | None = None
    ) -> list[list[DetectedFace]]:
        """As FaceDetector.detect; a frame with more than the model's K faces (32) keeps its K best."""
        validate_frames(frames)
        frames = np.ascontiguousarray(frames)
        thresholds = request_thresholds(self.defaults, min_face_size, min_score)
        count = len(frames)
        if count == 0:
            return []
        if not has_pyramid(frames, thresholds):
            return [[] for _ in range(count)]
        options = np.tile(np.array(dataclasses.astuple(thresholds), np.float32), (count, 1))

        async def infer(part: slice) -> list[list[DetectedFace]]:
            answer = await self.runner.infer(
                self.model, {FRAMES: frames[part], OPTIONS: options[part]}, CASCADE_OUTPUTS
            )
            return faces_from_cascade(check_cascade_outputs(self.model, answer, len(frames[part])))

        parts = await self._batches.run(count, infer, max(1, MAX_REQUEST_BYTES // frames[0].nbytes))
        return [frame_faces for part in parts for frame_faces in part]

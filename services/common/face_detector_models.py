"""What the detector service must know to run the FaceFusion detectors a user imports.

Their names are face_model_catalog's DetectorName (the built-in MTCNN aside); Triton serves each under
that name, the FaceFusion file stem. Layouts, canvas, pixel ranges and channel order follow FaceFusion's
public `facefusion/face_detector.py` (prepare_detect_frame, normalize_detect_frame, detect_with_*) and
`face_helper.py` (create_static_anchors), as the importer's contracts do; the importer checks every
file against them, so a served model has these tensors.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from services.common.face_model_catalog import (
    BUILT_IN_DETECTOR,
    DETECTOR_NAMES,
    UNIT_RANGE,
    PixelScaling,
    fp32_twin_name,
)

# How a detector's outputs are decoded:
# - "yolo_rows" (YOLOFace): one output (batch, 20, candidates), each column a box centre x, centre y,
#   width and height in canvas pixels, a score, then five landmarks of (x, y, confidence);
# - "anchor_strides" (SCRFD, RetinaFace): nine outputs without a batch axis, so one frame a request: the
#   scores (rows, 1) of strides 8, 16 and 32, then their boxes (rows, 4), then their landmarks (rows, 10),
#   as distances from the anchor centres in units of the stride.
DetectorLayout = Literal["yolo_rows", "anchor_strides"]
DETECTOR_LAYOUTS: tuple[DetectorLayout, ...] = typing.get_args(DetectorLayout)

# Every imported detector takes the frame fitted onto a square canvas of this side (FaceFusion's only
# size for YOLOFace, and its default for SCRFD and RetinaFace).
DETECTOR_CANVAS = 640
FEATURE_STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2
LANDMARK_POINTS = 5
# YOLOFace's column: 4 box values, 1 score, 5 landmarks of (x, y, confidence).
YOLO_ROW_VALUES = 4 + 1 + LANDMARK_POINTS * 3
YOLO_CANDIDATES = sum((DETECTOR_CANVAS // stride) ** 2 for stride in FEATURE_STRIDES)
# Frames one YOLOFace request may carry: the importer's max_batch_size for batched models.
YOLO_MAX_BATCH = 64
DETECTOR_INPUT = "input"
# FaceFusion's defaults: face_detector_score 0.5, and the NMS overlap of a single detection angle
# (face_helper.get_nms_threshold).
DEFAULT_MIN_SCORE = 0.5
NMS_OVERLAP = 0.4
# YOLOFace takes 0..1 (UNIT_RANGE); SCRFD and RetinaFace (x - 127.5) / 128 (normalize_detect_frame).
ANCHOR_STRIDE_SCALING = PixelScaling(offset=127.5, divisor=128.0)

IMPORTED_DETECTOR_NAMES: tuple[str, ...] = tuple(name for name in DETECTOR_NAMES if name != BUILT_IN_DETECTOR)


@dataclass(frozen=True)
class DetectorModelSpec:
    """One imported detector as the service runs it. The frames arrive RGB; every one of these models
    takes BGR (FaceFusion hands it OpenCV's frames as they are)."""

    name: str
    layout: DetectorLayout
    scaling: PixelScaling

    @property
    def output_count(self) -> int:
        return 1 if self.layout == "yolo_rows" else 3 * len(FEATURE_STRIDES)


DETECTOR_MODELS: Mapping[str, DetectorModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            DetectorModelSpec("yoloface_8n", "yolo_rows", UNIT_RANGE),
            DetectorModelSpec("scrfd_2.5g", "anchor_strides", ANCHOR_STRIDE_SCALING),
            DetectorModelSpec("retinaface_10g", "anchor_strides", ANCHOR_STRIDE_SCALING),
        )
    }
)
if tuple(DETECTOR_MODELS) != IMPORTED_DETECTOR_NAMES:
    raise RuntimeError(f"detector specs {tuple(DETECTOR_MODELS)} differ from the catalog's {IMPORTED_DETECTOR_NAMES}")

# Models whose outputs carry no batch axis: Triton serves them with max_batch_size 0, a frame a request.
# Their FP32 twins (`<name>_fp32`, the importer's) are alike.
UNBATCHED_MODELS: frozenset[str] = frozenset(
    served
    for spec in DETECTOR_MODELS.values()
    if spec.layout == "anchor_strides"
    for served in (spec.name, fp32_twin_name(spec.name))
)

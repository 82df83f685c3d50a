"""Pure box arithmetic of the MTCNN cascade, vectorised over every candidate of every frame.

Boxes are float arrays (n, 4) of x1, y1, x2, y2 in continuous pixel coordinates: a box covering
pixel columns 10..19 is x1=10, x2=20, so width = x2 - x1 (the original MTCNN's `+ 1` comes from
MATLAB's inclusive indices and is not repeated here).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]
IndexArray = NDArray[np.intp]

# 'union' is IoU; 'min' divides by the smaller area, so a box nested in a bigger one is suppressed.
NmsMode = Literal["union", "min"]
NMS_MODES: tuple[NmsMode, ...] = typing.get_args(NmsMode)

# P-Net sees 12x12 windows and its output grid advances 2 input pixels per cell.
PNET_CELL_SIZE = 12
PNET_STRIDE = 2


def box_widths(boxes: FloatArray) -> FloatArray:
    return boxes[:, 2] - boxes[:, 0]


def box_heights(boxes: FloatArray) -> FloatArray:
    return boxes[:, 3] - boxes[:, 1]


# OpenCV's stubs type its arguments as Python sequences; it takes numpy arrays as they are.
_NMS_BOXES_BATCHED: Callable[..., Any] = cv2.dnn.NMSBoxesBatched


def nms(
    boxes: FloatArray,
    scores: FloatArray,
    threshold: float,
    mode: NmsMode = "union",
    groups: NDArray[np.integer] | None = None,
) -> IndexArray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    A box is dropped when its overlap with a better kept box exceeds `threshold`. Boxes of different
    `groups` (frame indices) never suppress each other. 'union' runs in OpenCV's C++ loop, several
    times faster than numpy on the hundreds of P-Net candidates of a batch; greedy_nms is the
    reference it is tested against and the implementation of 'min'.
    """
    if mode not in NMS_MODES:
        raise ValueError(f"nms mode {mode!r} is not one of {', '.join(NMS_MODES)}")
    if len(boxes) == 0:
        return np.zeros(0, np.intp)
    if mode == "min":
        return greedy_nms(boxes, scores, threshold, mode, groups)
    # OpenCV separates groups by offsets that assume non-negative coordinates; a translation
    # changes no overlap.
    shifted = boxes.astype(np.float64) - min(float(boxes.min()), 0.0)
    xywh = np.concatenate([shifted[:, :2], shifted[:, 2:] - shifted[:, :2]], axis=1)
    labels = np.zeros(len(boxes), np.int32) if groups is None else groups.astype(np.int32)
    # A score threshold of -inf: NMS here never drops a box for its score alone.
    kept = _NMS_BOXES_BATCHED(xywh, scores.astype(np.float32), labels, -np.inf, float(threshold))
    return np.asarray(kept, np.intp).reshape(-1)


def greedy_nms(
    boxes: FloatArray,
    scores: FloatArray,
    threshold: float,
    mode: NmsMode = "union",
    groups: NDArray[np.integer] | None = None,
) -> IndexArray:
    """nms in numpy, for both modes."""
    if len(boxes) == 0:
        return np.zeros(0, np.intp)
    shifted = boxes.astype(np.float64)
    if groups is not None:
        # Moving each group to its own far-off region keeps one vectorised pass for all frames.
        span = float(np.abs(shifted).max()) * 2.0 + 1.0
        shifted = shifted + (groups.astype(np.float64) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = np.ascontiguousarray(shifted[order].T)
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    alive = np.ones(len(order), bool)
    keep: list[int] = []
    for best in range(len(order)):
        if not alive[best]:
            continue
        keep.append(best)
        rest = slice(best + 1, None)
        inter_w = np.maximum(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0.0)
        inter_h = np.maximum(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0.0)
        inter = inter_w * inter_h
        union = areas[best] + areas[rest] - inter
        denominator = np.minimum(areas[best], areas[rest]) if mode == "min" else union
        alive[rest] &= inter <= threshold * denominator
    return order[np.asarray(keep, np.intp)]


def apply_regression(boxes: FloatArray, offsets: FloatArray) -> FloatArray:
    """Moves each edge by its offset times the box's width (x) or height (y)."""
    sizes = np.stack([box_widths(boxes), box_heights(boxes)] * 2, axis=1)
    return (boxes + offsets * sizes).astype(np.float32)


def square_boxes(boxes: FloatArray) -> FloatArray:
    """Grows each box's shorter side to its longer one, keeping the centre (MTCNN's rerec)."""
    side = np.maximum(box_widths(boxes), box_heights(boxes))
    centre_x = (boxes[:, 0] + boxes[:, 2]) * 0.5
    centre_y = (boxes[:, 1] + boxes[:, 3]) * 0.5
    half = side * 0.5
    return np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=1).astype(np.float32)


def pyramid_scales(shortest_side: int, min_face_size: int, scale_factor: float) -> list[float]:
    """Image scales at which a P-Net window covers faces from min_face_size up to the whole frame."""
    scale = PNET_CELL_SIZE / min_face_size
    scales = []
    while shortest_side * scale >= PNET_CELL_SIZE:
        scales.append(scale)
        scale *= scale_factor
    return scales


def grid_boxes(
    probability: FloatArray, regression: FloatArray, scale: float, threshold: float
) -> tuple[IndexArray, FloatArray, FloatArray, FloatArray]:
    """Turns P-Net maps (N, h, w) face probability and (N, 4, h, w) regression into candidates.

    Returns frame index, box in frame pixels, score and regression offsets of every cell at or above
    `threshold`.
    """
    frame_index, row, column = np.nonzero(probability >= threshold)
    scores = probability[frame_index, row, column].astype(np.float32)
    offsets = regression[frame_index, :, row, column].astype(np.float32)
    left = column.astype(np.float32) * PNET_STRIDE
    top = row.astype(np.float32) * PNET_STRIDE
    boxes = np.stack([left, top, left + PNET_CELL_SIZE, top + PNET_CELL_SIZE], axis=1) / np.float32(scale)
    return frame_index.astype(np.intp), boxes.astype(np.float32), scores, offsets


def snap_to_pixels(boxes: FloatArray) -> FloatArray:
    """Rounds half up (np.round's half-to-even could shrink a one-pixel box to nothing)."""
    return np.floor(boxes + np.float32(0.5)).astype(np.float32)


def crop_with_padding(image: NDArray[np.uint8], box: FloatArray, size: int) -> NDArray[np.uint8]:
    """The box's region resized to size x size (INTER_AREA); parts outside the image are black.

    Zero padding (not clipping the box to the image) keeps the face where the network expects it
    within the crop, as in the original MTCNN.
    """
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in snap_to_pixels(box))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {box.tolist()} is empty")
    inside_x1, inside_y1 = max(x1, 0), max(y1, 0)
    inside_x2, inside_y2 = min(x2, width), min(y2, height)
    if inside_x1 == x1 and inside_y1 == y1 and inside_x2 == x2 and inside_y2 == y2:
        region = image[y1:y2, x1:x2]
    else:
        region = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        if inside_x2 > inside_x1 and inside_y2 > inside_y1:
            region[inside_y1 - y1 : inside_y2 - y1, inside_x1 - x1 : inside_x2 - x1] = image[
                inside_y1:inside_y2, inside_x1:inside_x2
            ]
    return np.asarray(cv2.resize(region, (size, size), interpolation=cv2.INTER_AREA), np.uint8)


def crops_with_padding(
    frames: NDArray[np.uint8], frame_index: IndexArray, boxes: FloatArray, size: int
) -> NDArray[np.uint8]:
    """(n, size, size, 3) crops of every box from its frame of the (N, H, W, 3) batch."""
    crops = np.empty((len(boxes), size, size, 3), np.uint8)
    for slot, (index, box) in enumerate(zip(frame_index, boxes, strict=True)):
        crops[slot] = crop_with_padding(frames[index], box, size)
    return crops


def pyramid_crops(
    levels: Sequence[NDArray[np.uint8]], frame_index: IndexArray, boxes: FloatArray, size: int
) -> tuple[NDArray[np.uint8], FloatArray]:
    """Crops of `boxes` (frame pixels), each taken from the smallest level that still has `size` pixels
    across the box; levels[0] is the (N, H, W, 3) frames themselves, the rest downscaled copies.

    A 300-pixel face then costs a resize from about 34 pixels instead of 300. Returns the crops and,
    in frame pixels, the box each crop really covers after snapping to its level's pixels: the
    networks' regression and landmarks are relative to that box.
    """
    height, width = levels[0].shape[1:3]
    ratios = np.array([[level.shape[2] / width, level.shape[1] / height] for level in levels], np.float32)
    sides = np.maximum(box_widths(boxes), box_heights(boxes))
    big_enough = sides[:, None] * ratios.min(axis=1)[None, :] >= size
    # Levels shrink monotonically, so the usable ones are a prefix; too small a box uses the frames.
    choice = np.maximum(big_enough.sum(axis=1) - 1, 0)
    crops = np.empty((len(boxes), size, size, 3), np.uint8)
    covered = np.empty_like(boxes)
    for level_number in np.unique(choice):
        members = np.flatnonzero(choice == level_number)
        ratio = np.tile(ratios[level_number], 2)
        level_boxes = snap_to_pixels(boxes[members] * ratio)
        crops[members] = crops_with_padding(levels[level_number], frame_index[members], level_boxes, size)
        covered[members] = level_boxes / ratio
    return crops, covered

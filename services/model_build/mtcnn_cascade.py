"""MTCNN's whole cascade as one torch module over a batch of frames, so detection runs on the GPU.

services/detector/face_detector.py's FaceDetector sends P-Net, R-Net and O-Net requests and does the
pyramid, NMS and crops between them in numpy and OpenCV: on the GPU machine that CPU work cost 35 ms a
frame. MtcnnCascade does every step between the networks as batched tensor work on the frames' device
(CPU or CUDA), so the detector sends one request per batch of frames and gets padded answers back.

It follows FaceDetector step for step, with the same thresholds and NMS rules, so that both find the
same faces (tests/model_build/test_mtcnn_cascade.py):
- Pyramid levels and R-Net/O-Net crops are resampled with OpenCV's INTER_AREA weights (a fractional
  box filter when shrinking, OpenCV's linear rule when a small crop is enlarged), applied as matrix
  products and rounded to whole pixel values as OpenCV's uint8 images are. F.interpolate's "area"
  mode averages whole pixels only and its antialiased bilinear is a triangle filter: both move P-Net's
  scores near its threshold enough to change which windows pass.
- Crops come from the smallest pyramid level that still has the crop's resolution, zero-padded where
  a box leaves the frame; regression and landmarks apply to the box a crop really covered.
- NMS is exact greedy NMS within each frame (and P-Net level), batched over frames by padding each
  frame's candidates into one row. Overlaps are computed as OpenCV's NMS computes them (float64, then
  rounded to float32): P-Net's 2-pixel grid makes overlaps of exactly the threshold common, and any
  other arithmetic decides some of those ties the other way.

Options travel per frame as an (n, 5) input, in services.detector.face_detector.CASCADE_OPTIONS order:
the detector's settings and a request's overrides reach the model, which holds no thresholds itself.
Triton's dynamic batcher may join requests with different options; frames are then run in groups of
equal options. Outputs are padded to max_faces per frame, best score first, with counts saying how
many rows of each frame are faces.

Written for torch.jit.script, so that production Triton serves it with its PyTorch backend; the nets
run in their parameters' dtype (fp16 when served in half precision) while pixels and boxes stay float32.
Levels and crops are kept (n, h, w, 3), so the nets see them channels-last, whose pooling runs several
times faster on CPUs than channels-first.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from services.common.media_paths import temporary_path
from services.common.torch_runtime import save_state_dict
from services.detector.box_ops import PNET_CELL_SIZE, PNET_STRIDE
from services.detector.face_detector import (
    CASCADE_MODEL,
    CASCADE_OPTIONS,
    MAX_FACES,
    ONET_NMS,
    ONET_NMS_MODE,
    ONET_SIDE,
    PNET_LEVEL_NMS,
    PNET_MERGED_NMS,
    RNET_NMS,
    RNET_SIDE,
)
from services.model_build.mtcnn_export import example_input, read_state_dict
from services.model_build.mtcnn_nets import MTCNN_STAGES, MtcnnStage, OutputNet, ProposalNet, RefineNet
from services.triton.model_config import MODEL_VERSION, torch_weights_path

# The production config (triton_models/mtcnn_cascade/config.pbtxt) names this file as its
# default_model_filename: model.pt beside it is the plain state dict the Python-backend twin loads.
TORCHSCRIPT_FILE = "model.torchscript.pt"

# Bounds on the elements of one overlap block and one crop gather: the work is split so that its
# temporaries stay within a few hundred MB however many candidates a batch has.
NMS_BLOCK_ELEMENTS = 1 << 22
CROP_BLOCK_ELEMENTS = 1 << 24
# R-Net and O-Net run on at most this many crops at once, for the same reason.
NET_BATCH = 2048
# OpenCV's INTER_AREA leaves out a source pixel that a destination pixel overlaps by less than this.
AREA_MIN_OVERLAP = 1e-3
# std::numeric_limits<double>::epsilon(): OpenCV's NMS takes two boxes of no area for one box.
DOUBLE_EPSILON = 2.220446049250313e-16

# Greedy NMS's fixed-point rounds run this many at a time between checks: each check waits for the
# device, and rounds past the fixed point leave it where it is.
NMS_ROUNDS_PER_CHECK = 4

# TorchScript reads no Python globals: functions take the constants above as argument defaults, and
# the module keeps the rest as attributes named in __constants__.


# A batch's frames and pyramid levels in one flat (P, 3) float32 buffer, so that crops from every level
# are one gather: level i's (n, heights[i], widths[i], 3) pixels start at pixel origins[i], and ratios[i]
# is its (width, height) over the frames'. Level 0 is the frames. Declared with real types, not the
# class syntax: TorchScript cannot resolve a NamedTuple's postponed annotations.
Pyramid = NamedTuple(  # noqa: UP014
    "Pyramid",
    [("pixels", Tensor), ("origins", Tensor), ("heights", Tensor), ("widths", Tensor), ("ratios", Tensor)],
)


def pyramid_scales(
    shortest_side: int, min_face_size: float, scale_factor: float, cell_size: int = PNET_CELL_SIZE
) -> list[float]:
    """box_ops.pyramid_scales, for TorchScript."""
    scale = cell_size / min_face_size
    scales: list[float] = []
    while shortest_side * scale >= cell_size:
        scales.append(scale)
        scale *= scale_factor
    return scales


def area_weights(
    sizes: Tensor, out_size: int, span: int, enlarged: Tensor, min_overlap: float = AREA_MIN_OVERLAP
) -> Tensor:
    """(c, out_size, span) weights of cv2.resize INTER_AREA from `sizes[i]` pixels to out_size.

    Rows where `enlarged` is set use OpenCV's rule for INTER_AREA when either side grows: linear
    weights placed by area. Columns past a row's size get no weight, so the weights do not depend on
    `span`. Computed in float64 with OpenCV's own scale (1 / (out / in)) so that cell boundaries fall
    where OpenCV's do, row by row: finding the distinct sizes first would wait for the device.
    """
    device = sizes.device
    source = sizes.to(torch.float64)[:, None, None]
    grows = enlarged[:, None, None]
    scale = 1.0 / (out_size / source)
    out = torch.arange(out_size, dtype=torch.float64, device=device)[None, :, None]
    pixel = torch.arange(span, dtype=torch.float64, device=device)[None, None, :]
    start = out * scale
    overlap = (torch.minimum(start + scale, pixel + 1.0) - torch.maximum(start, pixel)).clamp(min=0.0)
    overlap = torch.where(overlap > min_overlap, overlap, torch.zeros_like(overlap))
    box = overlap / torch.minimum(scale, source - start)
    first = torch.floor(out * scale)
    fraction = (out + 1.0) - (first + 1.0) * (out_size / source)
    fraction = torch.where(fraction <= 0.0, torch.zeros_like(fraction), fraction - torch.floor(fraction))
    at_end = first >= source - 1.0
    fraction = torch.where(at_end, torch.zeros_like(fraction), fraction)
    first = torch.where(at_end, source - 1.0, first)
    lerp = (pixel == first).to(torch.float64) * (1.0 - fraction) + (pixel == first + 1.0).to(torch.float64) * fraction
    return torch.where(grows, lerp, box).to(torch.float32)


def device_values(values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of host values made on the device by fills: torch.tensor(values, device=...) copies
    from pageable host memory, which waits for every kernel queued before it."""
    if len(values) == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([torch.full((1,), value, dtype=dtype, device=device) for value in values])


def as_pixels(values: Tensor) -> Tensor:
    """Float pixels rounded and saturated as OpenCV writes a uint8 image."""
    return torch.round(values).clamp(0.0, 255.0)


def resize_area(images: Tensor, out_height: int, out_width: int) -> Tensor:
    """(n, H, W, 3) float pixels -> (n, out_height, out_width, 3), as cv2.resize INTER_AREA shrinks."""
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    device = images.device
    shrunk = torch.zeros(1, dtype=torch.bool, device=device)
    rows = area_weights(torch.full((1,), height, device=device), out_height, height, shrunk)[0]
    columns = area_weights(torch.full((1,), width, device=device), out_width, width, shrunk)[0]
    resized = torch.matmul(rows, images.reshape(count, height, width * 3)).reshape(count, out_height, width, 3)
    return as_pixels(torch.matmul(columns, resized))


def crop_boxes(
    pixels: Tensor, origins: Tensor, heights: Tensor, widths: Tensor, boxes: Tensor, side: int, span: int
) -> Tensor:
    """(c, side, side, 3) crops of whole-pixel `boxes` from images laid out flat in `pixels` ((P, 3)):
    box i's image starts at pixel origins[i] and is heights[i] x widths[i]; no box side exceeds `span`.

    Parts of a box outside its image are black, as box_ops.crop_with_padding pads them: the weights
    of rows and columns outside the image are zeroed rather than the pixels, which is the same sum.
    """
    corners = boxes.to(torch.int64)
    left, top = corners[:, 0], corners[:, 1]
    box_widths, box_heights = corners[:, 2] - left, corners[:, 3] - top
    enlarged = (box_widths < side) | (box_heights < side)
    steps = torch.arange(span, device=pixels.device)
    columns = left[:, None] + steps
    rows = top[:, None] + steps
    column_inside = (columns >= 0) & (columns < widths[:, None])
    row_inside = (rows >= 0) & (rows < heights[:, None])
    column_weights = area_weights(box_widths, side, span, enlarged) * column_inside[:, None, :]
    row_weights = area_weights(box_heights, side, span, enlarged) * row_inside[:, None, :]
    rows = torch.minimum(rows.clamp(min=0), heights[:, None] - 1)
    columns = torch.minimum(columns.clamp(min=0), widths[:, None] - 1)
    flat = origins[:, None, None] + (rows * widths[:, None])[:, :, None] + columns[:, None, :]
    count = boxes.shape[0]
    patches = pixels.index_select(0, flat.reshape(-1)).reshape(count, span, span * 3)
    resized_rows = torch.bmm(row_weights, patches).reshape(count, side, span, 3)
    return as_pixels(torch.einsum("cxq,cyqk->cyxk", column_weights, resized_rows))


def pyramid_crops(
    pyramid: Pyramid,
    frame_index: Tensor,
    boxes: Tensor,
    side: int,
    block_elements: int = CROP_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """box_ops.pyramid_crops: (c, side, side, 3) crops and the boxes they really cover, in frame pixels.

    Each box is cropped from the smallest level that still has the crop's resolution, all levels in
    one gather: the only wait for the device is the longest box side, which sizes the gather.
    """
    count = boxes.shape[0]
    crops = torch.zeros((count, side, side, 3), dtype=torch.float32, device=boxes.device)
    if count == 0:
        return crops, torch.zeros_like(boxes)
    ratios = pyramid.ratios
    sides = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    big_enough = sides[:, None] * ratios.min(dim=1).values[None, :] >= side
    choice = (big_enough.sum(dim=1) - 1).clamp(min=0)
    ratio = ratios[choice].repeat(1, 2)
    level_boxes = torch.floor(boxes * ratio + 0.5)
    covered = level_boxes / ratio
    spans = torch.maximum(level_boxes[:, 2] - level_boxes[:, 0], level_boxes[:, 3] - level_boxes[:, 1])
    span = max(1, int(spans.max()))
    heights = pyramid.heights[choice]
    widths = pyramid.widths[choice]
    origins = pyramid.origins[choice] + frame_index * heights * widths
    per_block = max(1, block_elements // (span * span * 3))
    for start in range(0, count, per_block):
        end = min(count, start + per_block)
        crops[start:end] = crop_boxes(
            pyramid.pixels,
            origins[start:end],
            heights[start:end],
            widths[start:end],
            level_boxes[start:end],
            side,
            span,
        )
    return crops, covered


def overlap_exceeds(
    rows: Tensor, columns: Tensor, threshold: float, by_smaller_area: bool, epsilon: float = DOUBLE_EPSILON
) -> Tensor:
    """(g, r, c) whether box rows[g, i] overlaps columns[g, j] by more than `threshold` (float64 boxes).

    'union' is computed as OpenCV's NMSBoxes computes it (box_ops.nms runs it): the intersection of
    cv::Rect2d, then 1 - float32(1 - IoU) compared in float32, which rounds overlaps within 3e-8 of
    the threshold onto it (P-Net's 2-pixel grid makes overlaps of exactly 0.5 common). 'min' is
    computed as box_ops.greedy_nms does, in float64.
    """
    a = rows[:, :, None, :]
    b = columns[:, None, :, :]
    widths_a, heights_a = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    widths_b, heights_b = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    if by_smaller_area:
        inter_width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0.0)
        inter_height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0.0)
        smaller = torch.minimum(
            widths_a.clamp(min=0.0) * heights_a.clamp(min=0.0), widths_b.clamp(min=0.0) * heights_b.clamp(min=0.0)
        )
        return inter_width * inter_height > threshold * smaller
    a_left = a[..., 0] < b[..., 0]
    a_top = a[..., 1] < b[..., 1]
    inter_width = torch.minimum(
        torch.where(a_left, widths_a - (b[..., 0] - a[..., 0]), widths_b - (a[..., 0] - b[..., 0])),
        torch.where(a_left, widths_b, widths_a),
    )
    inter_height = torch.minimum(
        torch.where(a_top, heights_a - (b[..., 1] - a[..., 1]), heights_b - (a[..., 1] - b[..., 1])),
        torch.where(a_top, heights_b, heights_a),
    )
    overlapping = (inter_width > 0.0) & (inter_height > 0.0)
    inter = torch.where(overlapping, inter_width * inter_height, torch.zeros_like(inter_width))
    areas = widths_a * heights_a + widths_b * heights_b
    distance = 1.0 - inter / (areas - inter)
    distance = torch.where(areas <= epsilon, torch.zeros_like(distance), distance)
    overlap = 1.0 - distance.to(torch.float32)
    return overlap > torch.full((1,), threshold, dtype=torch.float32, device=rows.device)


def greedy_keep(
    boxes: Tensor,
    valid: Tensor,
    threshold: float,
    by_smaller_area: bool,
    block_elements: int = NMS_BLOCK_ELEMENTS,
    rounds_per_check: int = NMS_ROUNDS_PER_CHECK,
) -> Tensor:
    """Greedy NMS of every row of (g, m, 4) float64 boxes sorted best first; (g, m) kept mask.

    Greedy NMS keeps a box unless a better kept box overlaps it. That rule has one solution, which
    iterating it from "all kept" reaches, one more settled box per round at worst and in a few rounds
    in practice: each round is one batched tensor step, so no box is visited in a Python loop.
    Columns are taken in blocks when a row has too many boxes for one (m, m) matrix.
    """
    group_count, width = valid.shape[0], valid.shape[1]
    keep = torch.zeros_like(valid)
    if width == 0:
        return keep
    groups_per_chunk = max(1, block_elements // (width * width))
    block = width if width * width <= block_elements else max(1, block_elements // width)
    for group_start in range(0, group_count, groups_per_chunk):
        group_end = min(group_count, group_start + groups_per_chunk)
        for start in range(0, width, block):
            end = min(width, start + block)
            exceeds = overlap_exceeds(
                boxes[group_start:group_end, :end], boxes[group_start:group_end, start:end], threshold, by_smaller_area
            )
            allowed = valid[group_start:group_end, start:end]
            if start > 0:
                earlier = keep[group_start:group_end, :start, None] & exceeds[:, :start, :]
                allowed = allowed & ~earlier.any(dim=1)
            better = torch.ones((end - start, end - start), dtype=torch.bool, device=boxes.device).triu(diagonal=1)
            within = exceeds[:, start:end, :] & better
            kept = allowed
            while True:
                for _ in range(rounds_per_check - 1):
                    kept = allowed & ~(kept[:, :, None] & within).any(dim=1)
                settled = allowed & ~(kept[:, :, None] & within).any(dim=1)
                if torch.equal(settled, kept):
                    break
                kept = settled
            keep[group_start:group_end, start:end] = kept
    return keep


def rank_in_groups(groups: Tensor, scores: Tensor, group_count: int) -> Tensor:
    """(group_count, m) indices of each group's members, best score first (ties in input order); -1 pads."""
    by_score = torch.sort(scores, stable=True, descending=True).indices
    order = by_score[torch.sort(groups[by_score], stable=True).indices]
    sorted_groups = groups[order]
    sizes = torch.bincount(sorted_groups, minlength=group_count)
    width = int(sizes.max()) if group_count > 0 and order.numel() > 0 else 0
    table = torch.full((group_count, width), -1, dtype=torch.int64, device=scores.device)
    starts = torch.cumsum(sizes, dim=0) - sizes
    rank = torch.arange(order.numel(), device=scores.device) - starts[sorted_groups]
    table[sorted_groups, rank] = order
    return table


def nms(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    group_count: int,
    threshold: float,
    by_smaller_area: bool,
    block_elements: int = NMS_BLOCK_ELEMENTS,
) -> Tensor:
    """Indices of the boxes greedy NMS keeps within each group (frame), by group, then best score first.

    box_ops.nms in torch: boxes of different groups never suppress each other.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    table = rank_in_groups(groups, scores, group_count)
    valid = table >= 0
    padded = boxes.to(torch.float64)[table.clamp(min=0)]
    return table[greedy_keep(padded, valid, threshold, by_smaller_area, block_elements)]


def apply_regression(boxes: Tensor, offsets: Tensor) -> Tensor:
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes + offsets * torch.stack([widths, heights, widths, heights], dim=1)


def square_boxes(boxes: Tensor) -> Tensor:
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    centre_x = (boxes[:, 0] + boxes[:, 2]) * 0.5
    centre_y = (boxes[:, 1] + boxes[:, 3]) * 0.5
    half = side * 0.5
    return torch.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], dim=1)


def non_empty(boxes: Tensor) -> Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)


class MtcnnCascade(nn.Module):
    """frames (n, H, W, 3) uint8 RGB and options (n, 5) -> boxes (n, K, 4), scores (n, K),
    landmarks (n, K, 5, 2) float32 and counts (n, 1) int32; K = max_faces.

    Boxes are clipped to the frame and landmarks are not, as FaceDetector answers; rows past a frame's
    count are zero. A frame with more than K faces keeps its K best.
    """

    __constants__ = (
        "max_faces",
        "option_count",
        "face_size_column",
        "pnet_score_column",
        "rnet_score_column",
        "min_score_column",
        "scale_factor_column",
        "cell_size",
        "stride",
        "rnet_side",
        "onet_side",
        "pnet_level_nms",
        "pnet_merged_nms",
        "rnet_nms",
        "onet_nms",
        "onet_nms_by_smaller_area",
        "net_batch",
    )

    def __init__(self, max_faces: int = MAX_FACES) -> None:
        super().__init__()
        self.pnet = ProposalNet()
        self.rnet = RefineNet()
        self.onet = OutputNet()
        self.max_faces = max_faces
        self.option_count = len(CASCADE_OPTIONS)
        self.face_size_column = CASCADE_OPTIONS.index("min_face_size")
        self.pnet_score_column = CASCADE_OPTIONS.index("pnet_score")
        self.rnet_score_column = CASCADE_OPTIONS.index("rnet_score")
        self.min_score_column = CASCADE_OPTIONS.index("min_score")
        self.scale_factor_column = CASCADE_OPTIONS.index("scale_factor")
        self.cell_size = PNET_CELL_SIZE
        self.stride = PNET_STRIDE
        self.rnet_side = RNET_SIDE
        self.onet_side = ONET_SIDE
        self.pnet_level_nms = PNET_LEVEL_NMS
        self.pnet_merged_nms = PNET_MERGED_NMS
        self.rnet_nms = RNET_NMS
        self.onet_nms = ONET_NMS
        self.onet_nms_by_smaller_area = ONET_NMS_MODE == "min"
        self.net_batch = NET_BATCH

    def forward(self, frames: Tensor, options: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if frames.dim() != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8:
            raise ValueError("mtcnn cascade frames must be (count, height, width, 3) uint8")
        count = frames.shape[0]
        if options.dim() != 2 or options.shape[0] != count or options.shape[1] != self.option_count:
            raise ValueError("mtcnn cascade options must be (count, options), one row per frame")
        # Half-precision serving hands the options over in fp16: their rounding (under 3e-4) is below
        # the nets' own in that precision. They are read on the host, where every decision on them is
        # made without waiting for the device again; nothing is queued on it yet.
        settings = options.to(torch.float32).cpu()
        self.check_options(settings)
        if bool((settings == settings[0]).all()):
            return self.detect_group(frames, settings[0])
        device = frames.device
        boxes = torch.zeros((count, self.max_faces, 4), dtype=torch.float32, device=device)
        scores = torch.zeros((count, self.max_faces), dtype=torch.float32, device=device)
        landmarks = torch.zeros((count, self.max_faces, 5, 2), dtype=torch.float32, device=device)
        counts = torch.zeros((count, 1), dtype=torch.int32, device=device)
        pending = torch.ones(count, dtype=torch.bool)
        while bool(pending.any()):
            first = int(pending.nonzero()[0, 0])
            alike = pending & (settings == settings[first]).all(dim=1)
            members = alike.nonzero().flatten().to(device)
            group_boxes, group_scores, group_landmarks, group_counts = self.detect_group(
                frames[members], settings[first]
            )
            boxes[members] = group_boxes
            scores[members] = group_scores
            landmarks[members] = group_landmarks
            counts[members] = group_counts
            pending = pending & ~alike
        return boxes, scores, landmarks, counts

    def check_options(self, options: Tensor) -> None:
        """Refuses options that would loop forever or mean nothing (the pyramid needs 0 < scale_factor < 1)."""
        if not bool(torch.isfinite(options).all()):
            raise ValueError("mtcnn cascade options must be finite")
        if bool((options[:, self.face_size_column] < 1.0).any()):
            raise ValueError("mtcnn cascade min_face_size must be at least 1")
        scale_factors = options[:, self.scale_factor_column]
        if bool(((scale_factors <= 0.0) | (scale_factors >= 1.0)).any()):
            raise ValueError("mtcnn cascade scale_factor must be inside (0, 1)")
        scores = options[:, [self.pnet_score_column, self.rnet_score_column, self.min_score_column]]
        if bool(((scores < 0.0) | (scores > 1.0)).any()):
            raise ValueError("mtcnn cascade scores must be inside [0, 1]")

    def detect_group(self, frames: Tensor, option: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The cascade over frames that share one row of options (on the host)."""
        count = frames.shape[0]
        face_size = max(float(option[self.face_size_column]), float(self.cell_size))
        scales = pyramid_scales(
            min(frames.shape[1], frames.shape[2]), face_size, float(option[self.scale_factor_column])
        )
        pyramid, levels = self.build_pyramid(frames, scales)
        frame_index, boxes = self.propose(levels, scales, float(option[self.pnet_score_column]), count)
        frame_index, boxes = self.refine(pyramid, frame_index, boxes, float(option[self.rnet_score_column]), count)
        return self.output(
            pyramid, frame_index, boxes, float(option[self.min_score_column]), count, frames.shape[1], frames.shape[2]
        )

    def build_pyramid(self, frames: Tensor, scales: list[float]) -> tuple[Pyramid, list[Tensor]]:
        """The frames and a level for each scale in one flat buffer, and each level as an (n, h, w, 3) view.

        Every smaller level is resized from the first, as FaceDetector does; a level of the first's size
        is the first.
        """
        count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
        shapes: list[list[int]] = [[height, width]]
        for scale in scales:
            shapes.append([math.ceil(height * scale), math.ceil(width * scale)])
        origins: list[int] = []
        total = 0
        for number in range(len(shapes)):
            if number >= 2 and shapes[number] == shapes[1]:
                origins.append(origins[1])
            else:
                origins.append(total)
                total += count * shapes[number][0] * shapes[number][1]
        pixels = torch.empty((total, 3), dtype=torch.float32, device=frames.device)
        levels: list[Tensor] = []
        for number in range(len(shapes)):
            level_height, level_width = shapes[number][0], shapes[number][1]
            level = pixels[origins[number] : origins[number] + count * level_height * level_width]
            level = level.view(count, level_height, level_width, 3)
            if number == 0:
                level.copy_(frames)
            elif number == 1 or origins[number] != origins[1]:
                level.copy_(resize_area(levels[min(number - 1, 1)], level_height, level_width))
            levels.append(level)
        device = frames.device
        ratios: list[float] = []
        for shape in shapes:
            ratios.extend([shape[1] / width, shape[0] / height])
        pyramid = Pyramid(
            pixels,
            device_values([float(origin) for origin in origins], torch.int64, device),
            device_values([float(shape[0]) for shape in shapes], torch.int64, device),
            device_values([float(shape[1]) for shape in shapes], torch.int64, device),
            device_values(ratios, torch.float32, device).view(len(shapes), 2),
        )
        return pyramid, levels

    def propose(self, levels: list[Tensor], scales: list[float], threshold: float, count: int) -> tuple[Tensor, Tensor]:
        """P-Net over every pyramid level (levels[1:]), NMS within each level and then across levels;
        returns the frame index and squared, regressed box of every candidate.

        The levels' score maps are searched as one, so finding the windows that pass waits for the
        device once, not once a level.
        """
        device = levels[0].device
        if len(scales) == 0:
            return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros((0, 4), device=device)
        net_dtype = self.pnet.conv1.weight.dtype
        faces: list[Tensor] = []
        regressions: list[Tensor] = []
        starts: list[float] = []
        map_heights: list[float] = []
        map_widths: list[float] = []
        start = 0
        for number in range(len(scales)):
            level = levels[number + 1].permute(0, 3, 1, 2).to(net_dtype)
            probability, regression = self.pnet(level)
            faces.append(probability[:, 1].to(torch.float32).reshape(-1))
            regressions.append(regression.to(torch.float32).permute(0, 2, 3, 1).reshape(-1, 4))
            starts.append(float(start))
            map_heights.append(float(probability.shape[2]))
            map_widths.append(float(probability.shape[3]))
            start += count * probability.shape[2] * probability.shape[3]
        face = torch.cat(faces)
        hits = (face >= threshold).nonzero().flatten()
        level_starts = device_values(starts, torch.int64, device)
        level_of = torch.searchsorted(level_starts, hits, right=True) - 1
        local = hits - level_starts[level_of]
        map_height = device_values(map_heights, torch.int64, device)[level_of]
        map_width = device_values(map_widths, torch.int64, device)[level_of]
        frame = torch.div(local, map_height * map_width, rounding_mode="floor")
        cell = local - frame * map_height * map_width
        row = torch.div(cell, map_width, rounding_mode="floor")
        column = cell - row * map_width
        left = column.to(torch.float32) * self.stride
        top = row.to(torch.float32) * self.stride
        corners = torch.stack([left, top, left + self.cell_size, top + self.cell_size], dim=1)
        boxes = corners / device_values(scales, torch.float32, device)[level_of][:, None]
        scores = face[hits]
        offsets = torch.cat(regressions)[hits]
        groups = frame + level_of * count
        kept = nms(boxes, scores, groups, count * len(scales), self.pnet_level_nms, False)
        boxes, scores, offsets = boxes[kept], scores[kept], offsets[kept]
        frame_index = groups[kept] % count
        kept = nms(boxes, scores, frame_index, count, self.pnet_merged_nms, False)
        refined = square_boxes(apply_regression(boxes[kept], offsets[kept]))
        usable = non_empty(refined)
        return frame_index[kept][usable], refined[usable]

    def refine(
        self, pyramid: Pyramid, frame_index: Tensor, boxes: Tensor, threshold: float, count: int
    ) -> tuple[Tensor, Tensor]:
        """R-Net: drops candidates below `threshold`, NMS, regresses and squares the rest."""
        if boxes.shape[0] == 0:
            return frame_index, boxes
        crops, covered = pyramid_crops(pyramid, frame_index, boxes, self.rnet_side)
        net_dtype = self.rnet.conv1.weight.dtype
        probabilities: list[Tensor] = []
        regressions: list[Tensor] = []
        for start in range(0, crops.shape[0], self.net_batch):
            images = crops[start : start + self.net_batch].permute(0, 3, 1, 2).to(net_dtype)
            probability, regression = self.rnet(images)
            probabilities.append(probability.to(torch.float32))
            regressions.append(regression.to(torch.float32))
        scores = torch.cat(probabilities)[:, 1]
        passed = (scores >= threshold).nonzero().flatten()
        frame_index, covered, scores = frame_index[passed], covered[passed], scores[passed]
        offsets = torch.cat(regressions)[passed]
        kept = nms(covered, scores, frame_index, count, self.rnet_nms, False)
        refined = square_boxes(apply_regression(covered[kept], offsets[kept]))
        usable = non_empty(refined)
        return frame_index[kept][usable], refined[usable]

    def output(
        self,
        pyramid: Pyramid,
        frame_index: Tensor,
        boxes: Tensor,
        threshold: float,
        count: int,
        height: int,
        width: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """O-Net: final scores, boxes and landmarks, NMS by the smaller area, padded per frame."""
        device = boxes.device
        faces = torch.zeros((count, self.max_faces, 4), dtype=torch.float32, device=device)
        face_scores = torch.zeros((count, self.max_faces), dtype=torch.float32, device=device)
        face_landmarks = torch.zeros((count, self.max_faces, 5, 2), dtype=torch.float32, device=device)
        face_counts = torch.zeros((count, 1), dtype=torch.int32, device=device)
        if boxes.shape[0] == 0:
            return faces, face_scores, face_landmarks, face_counts
        crops, covered = pyramid_crops(pyramid, frame_index, boxes, self.onet_side)
        net_dtype = self.onet.conv1.weight.dtype
        probabilities: list[Tensor] = []
        regressions: list[Tensor] = []
        relative_points: list[Tensor] = []
        for start in range(0, crops.shape[0], self.net_batch):
            images = crops[start : start + self.net_batch].permute(0, 3, 1, 2).to(net_dtype)
            probability, regression, points = self.onet(images)
            probabilities.append(probability.to(torch.float32))
            regressions.append(regression.to(torch.float32))
            relative_points.append(points.to(torch.float32))
        scores = torch.cat(probabilities)[:, 1]
        passed = (scores >= threshold).nonzero().flatten()
        frame_index, covered, scores = frame_index[passed], covered[passed], scores[passed]
        relative = torch.cat(relative_points)[passed]
        box_widths = (covered[:, 2] - covered[:, 0])[:, None]
        box_heights = (covered[:, 3] - covered[:, 1])[:, None]
        points = torch.stack(
            [covered[:, 0:1] + box_widths * relative[:, 0:5], covered[:, 1:2] + box_heights * relative[:, 5:10]], dim=2
        )
        final = apply_regression(covered, torch.cat(regressions)[passed])
        kept = nms(final, scores, frame_index, count, self.onet_nms, self.onet_nms_by_smaller_area)
        table = rank_in_groups(frame_index[kept], scores[kept], count)[:, : self.max_faces]
        present = table >= 0
        rows = kept[table.clamp(min=0)]
        inside = final[rows].clamp(min=0.0)
        clipped = torch.stack(
            [
                inside[..., 0].clamp(max=float(width)),
                inside[..., 1].clamp(max=float(height)),
                inside[..., 2].clamp(max=float(width)),
                inside[..., 3].clamp(max=float(height)),
            ],
            dim=-1,
        )
        taken = table.shape[1]
        faces[:, :taken] = torch.where(present[:, :, None], clipped, torch.zeros_like(clipped))
        face_scores[:, :taken] = torch.where(present, scores[rows], torch.zeros_like(scores[rows]))
        face_landmarks[:, :taken] = torch.where(present[:, :, None, None], points[rows], torch.zeros_like(points[rows]))
        face_counts[:, 0] = present.sum(dim=1).to(torch.int32)
        return faces, face_scores, face_landmarks, face_counts


def new_mtcnn_cascade() -> MtcnnCascade:
    """The cascade with untrained nets; load a state dict from mtcnn_cascade_state_dict into it."""
    return MtcnnCascade()


def mtcnn_cascade_state_dict(stage_state_dicts: Mapping[MtcnnStage, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """One state dict for the cascade from the three nets' own (facenet-pytorch's pnet.pt, rnet.pt, onet.pt)."""
    return {f"{stage}.{name}": tensor for stage in MTCNN_STAGES for name, tensor in stage_state_dicts[stage].items()}


def load_mtcnn_cascade(weights_wheel: Path) -> MtcnnCascade:
    """The cascade with MTCNN's trained weights, read from the facenet-pytorch wheel."""
    cascade = new_mtcnn_cascade()
    state_dict = mtcnn_cascade_state_dict({stage: read_state_dict(weights_wheel, stage) for stage in MTCNN_STAGES})
    cascade.load_state_dict(state_dict, strict=True)
    return cascade.eval()


def scripted_cascade(cascade: MtcnnCascade) -> torch.jit.ScriptModule:
    """The cascade as TorchScript, for Triton's PyTorch backend.

    The three nets are traced (mtcnn_nets reads module-level constants, which TorchScript cannot
    compile; their graphs have no branches, so the trace holds for any batch and P-Net input size)
    and the cascade around them is scripted.
    """
    twin = MtcnnCascade(cascade.max_faces)
    twin.load_state_dict(cascade.state_dict(), strict=True)
    twin.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The trace notes that R-Net and O-Net read their batch size: it stays a graph input. torch
        # flags TorchScript as deprecated; Triton's PyTorch backend serves nothing else.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for stage in MTCNN_STAGES:
            twin.add_module(stage, torch.jit.trace(getattr(twin, stage), example_input(stage)))
        return torch.jit.script(twin)


def export_torchscript(cascade: MtcnnCascade, path: Path) -> Path:
    """Writes the scripted cascade (FP32) to `path` through a temporary name; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = scripted_cascade(cascade)
    temporary = temporary_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(scripted, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def torchscript_path(repository: Path) -> Path:
    return repository / CASCADE_MODEL / MODEL_VERSION / TORCHSCRIPT_FILE


def write_mtcnn_cascade(weights_wheel: Path, repository: Path) -> list[Path]:
    """`make models`' step for the cascade: `<repository>/mtcnn_cascade/1/model.torchscript.pt` for the
    production PyTorch backend and `model.pt` (the state dict) for the embedded Python-backend twin."""
    cascade = load_mtcnn_cascade(weights_wheel)
    return [
        export_torchscript(cascade, torchscript_path(repository)),
        save_state_dict(cascade, torch_weights_path(repository, CASCADE_MODEL)),
    ]

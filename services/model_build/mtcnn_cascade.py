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

# TorchScript reads no Python globals: functions take the constants above as argument defaults, and
# the module keeps the rest as attributes named in __constants__.


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
    weights placed by area. Columns past a row's size get no weight. Computed in float64 with
    OpenCV's own scale (1 / (out / in)) so that cell boundaries fall where OpenCV's do, once for each
    distinct size: candidates share a few dozen.
    """
    device = sizes.device
    distinct, which = torch.unique(sizes * 2 + enlarged.to(torch.int64), return_inverse=True)
    source = torch.div(distinct, 2, rounding_mode="floor").to(torch.float64)[:, None, None]
    grows = (distinct % 2 == 1)[:, None, None]
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
    return torch.where(grows, lerp, box).to(torch.float32)[which]


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


def crop_level(level: Tensor, frame_index: Tensor, boxes: Tensor, side: int) -> Tensor:
    """(c, side, side, 3) crops of whole-pixel `boxes` (level pixels) from the (n, h, w, 3) level.

    Parts of a box outside the level are black, as box_ops.crop_with_padding pads them: the weights
    of rows and columns outside the level are zeroed rather than the pixels, which is the same sum.
    """
    height, width = level.shape[1], level.shape[2]
    corners = boxes.to(torch.int64)
    left, top = corners[:, 0], corners[:, 1]
    box_widths, box_heights = corners[:, 2] - left, corners[:, 3] - top
    span = int(torch.maximum(box_widths.max(), box_heights.max()))
    enlarged = (box_widths < side) | (box_heights < side)
    steps = torch.arange(span, device=level.device)
    columns = left[:, None] + steps
    rows = top[:, None] + steps
    column_weights = area_weights(box_widths, side, span, enlarged) * ((columns >= 0) & (columns < width))[:, None, :]
    row_weights = area_weights(box_heights, side, span, enlarged) * ((rows >= 0) & (rows < height))[:, None, :]
    pixels = (
        (frame_index * (height * width))[:, None, None]
        + (rows.clamp(0, height - 1) * width)[:, :, None]
        + columns.clamp(0, width - 1)[:, None, :]
    )
    count = boxes.shape[0]
    patches = level.reshape(-1, 3).index_select(0, pixels.reshape(-1)).reshape(count, span, span * 3)
    resized_rows = torch.bmm(row_weights, patches).reshape(count, side, span, 3)
    return as_pixels(torch.einsum("cxq,cyqk->cyxk", column_weights, resized_rows))


def pyramid_crops(
    levels: list[Tensor],
    ratios: Tensor,
    frame_index: Tensor,
    boxes: Tensor,
    side: int,
    block_elements: int = CROP_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """box_ops.pyramid_crops: (c, side, side, 3) crops and the boxes they really cover, in frame pixels.

    levels[0] is the frames, the rest the pyramid; ratios[i] is level i's (width, height) over the frames'.
    """
    count = boxes.shape[0]
    sides = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    big_enough = sides[:, None] * ratios.min(dim=1).values[None, :] >= side
    choice = (big_enough.sum(dim=1) - 1).clamp(min=0)
    crops = torch.zeros((count, side, side, 3), dtype=torch.float32, device=boxes.device)
    covered = torch.zeros_like(boxes)
    for level_number in range(len(levels)):
        members = (choice == level_number).nonzero().flatten()
        if members.numel() == 0:
            continue
        ratio = ratios[level_number].repeat(2)
        level_boxes = torch.floor(boxes[members] * ratio + 0.5)
        covered[members] = level_boxes / ratio
        spans = torch.maximum(level_boxes[:, 2] - level_boxes[:, 0], level_boxes[:, 3] - level_boxes[:, 1])
        span = int(spans.max())
        per_block = max(1, block_elements // (span * span * 3))
        for start in range(0, members.numel(), per_block):
            block = members[start : start + per_block]
            crops[block] = crop_level(
                levels[level_number], frame_index[block], level_boxes[start : start + per_block], side
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
    boxes: Tensor, valid: Tensor, threshold: float, by_smaller_area: bool, block_elements: int = NMS_BLOCK_ELEMENTS
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
        # the nets' own in that precision.
        settings = options.to(torch.float32)
        self.check_options(settings)
        device = frames.device
        boxes = torch.zeros((count, self.max_faces, 4), dtype=torch.float32, device=device)
        scores = torch.zeros((count, self.max_faces), dtype=torch.float32, device=device)
        landmarks = torch.zeros((count, self.max_faces, 5, 2), dtype=torch.float32, device=device)
        counts = torch.zeros((count, 1), dtype=torch.int32, device=device)
        pending = torch.ones(count, dtype=torch.bool, device=device)
        while bool(pending.any()):
            first = int(pending.nonzero()[0, 0])
            alike = pending & (settings == settings[first]).all(dim=1)
            members = alike.nonzero().flatten()
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
        """The cascade over frames that share one row of options."""
        count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
        face_size = max(float(option[self.face_size_column]), float(self.cell_size))
        scales = pyramid_scales(min(height, width), face_size, float(option[self.scale_factor_column]))
        # Every smaller level is resized from the first, as FaceDetector does.
        levels = [frames.to(torch.float32)]
        ratios = [[1.0, 1.0]]
        for scale in scales:
            level_height, level_width = math.ceil(height * scale), math.ceil(width * scale)
            if len(levels) == 1:
                levels.append(resize_area(levels[0], level_height, level_width))
            elif levels[1].shape[1] == level_height and levels[1].shape[2] == level_width:
                levels.append(levels[1])
            else:
                levels.append(resize_area(levels[1], level_height, level_width))
            ratios.append([level_width / width, level_height / height])
        level_ratios = torch.tensor(ratios, dtype=torch.float32, device=frames.device)
        frame_index, boxes = self.propose(levels, scales, float(option[self.pnet_score_column]), count)
        frame_index, boxes = self.refine(
            levels, level_ratios, frame_index, boxes, float(option[self.rnet_score_column]), count
        )
        return self.output(
            levels, level_ratios, frame_index, boxes, float(option[self.min_score_column]), count, height, width
        )

    def propose(self, levels: list[Tensor], scales: list[float], threshold: float, count: int) -> tuple[Tensor, Tensor]:
        """P-Net over every pyramid level (levels[1:]), NMS within each level and then across levels;
        returns the frame index and squared, regressed box of every candidate."""
        device = levels[0].device
        net_dtype = self.pnet.conv1.weight.dtype
        groups: list[Tensor] = []
        boxes: list[Tensor] = []
        scores: list[Tensor] = []
        offsets: list[Tensor] = []
        for number in range(len(scales)):
            level = levels[number + 1].permute(0, 3, 1, 2).to(net_dtype)
            probability, regression = self.pnet(level)
            face = probability[:, 1].to(torch.float32)
            cells = (face >= threshold).nonzero()
            frame, row, column = cells[:, 0], cells[:, 1], cells[:, 2]
            left = column.to(torch.float32) * self.stride
            top = row.to(torch.float32) * self.stride
            corners = torch.stack([left, top, left + self.cell_size, top + self.cell_size], dim=1)
            boxes.append(corners / torch.full((1,), scales[number], dtype=torch.float32, device=device))
            scores.append(face[frame, row, column])
            offsets.append(regression.to(torch.float32).permute(0, 2, 3, 1)[frame, row, column])
            groups.append(frame + number * count)
        if len(boxes) == 0:
            return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros((0, 4), device=device)
        merged_boxes = torch.cat(boxes)
        merged_scores = torch.cat(scores)
        merged_offsets = torch.cat(offsets)
        merged_groups = torch.cat(groups)
        kept = nms(merged_boxes, merged_scores, merged_groups, count * len(scales), self.pnet_level_nms, False)
        merged_boxes, merged_scores, merged_offsets = merged_boxes[kept], merged_scores[kept], merged_offsets[kept]
        frame_index = merged_groups[kept] % count
        kept = nms(merged_boxes, merged_scores, frame_index, count, self.pnet_merged_nms, False)
        refined = square_boxes(apply_regression(merged_boxes[kept], merged_offsets[kept]))
        usable = non_empty(refined)
        return frame_index[kept][usable], refined[usable]

    def refine(
        self, levels: list[Tensor], ratios: Tensor, frame_index: Tensor, boxes: Tensor, threshold: float, count: int
    ) -> tuple[Tensor, Tensor]:
        """R-Net: drops candidates below `threshold`, NMS, regresses and squares the rest."""
        if boxes.shape[0] == 0:
            return frame_index, boxes
        crops, covered = pyramid_crops(levels, ratios, frame_index, boxes, self.rnet_side)
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
        levels: list[Tensor],
        ratios: Tensor,
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
        crops, covered = pyramid_crops(levels, ratios, frame_index, boxes, self.onet_side)
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
        limits = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
        clipped = torch.minimum(final[rows].clamp(min=0.0), limits)
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

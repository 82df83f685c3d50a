"""Face alignment and paste-back for a whole batch of frames held as torch tensors, on a GPU or the CPU.

The batch twin of face_aligner's OpenCV path, for frames that sit in GPU memory: one grid_sample cuts
every face of a batch out of its frame, one more warps every swapped crop and mask back, and the blend
is a gather and a scatter per round of faces. The regions faces are pasted into come from the small
(2, 3) matrices on the host (face_aligner.paste_region, the same as the OpenCV path), so the hot path
has no per-face wait on the device.

Sampling grids are built elementwise from the matrices rather than by affine_grid: affine_grid is a
matrix product, which TF32 (once anything in the process turns it on) rounds to 10 bits of mantissa,
enough to put samples pixels away from where they belong in a 1080p frame.

Where the frames are on a GPU, the detector's downscaled copy is made there too (shrink_batch), from
the same upload that alignment then uses, and crops stay there between alignment and paste-back: the
swapper's FP16 tensors are made from them and turned back into them on the device (DeviceCropCodec).

Frames may come as NV12 (pixel_formats), as NVDEC decodes and x264 encodes them: half RGB's bytes on the wire
and up the link. They are turned into RGB on the device after the upload, and only the pasted faces' regions are
turned back and come down, into the host frame's luma and chroma rows; the rest of the frame stays the decoder's
bytes.

This module imports torch; the worker imports it only when it warps on CUDA (chunk_runner.face_warper_for).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.common.fp32_fallback import non_finite_outputs
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import PixelFormat, describe_frames
from services.worker.face_aligner import KEPT_BATCHES, HostAlignedFaces, KeptBatches, even_box, paste_region

# cv2.blendLinear adds this to the weight sum; face_aligner.paste_back floors 1 - alpha at ALPHA_FLOOR.
BLEND_EPSILON = 1e-5
ALPHA_FLOOR = 1e-6


# BT.601 limited range in OpenCV's 20-bit fixed-point coefficients, so that the device converts as cv2 and the
# encoder's RGB path do (pixel_formats): luma from RGB, chroma from RGB, and RGB from luma and chroma.
_FIXED_ONE = float(1 << 20)
_RGB_TO_Y = torch.tensor([269484, 528482, 102760]) / _FIXED_ONE
_RGB_TO_U = torch.tensor([-155188, -305135, 460324]) / _FIXED_ONE
_RGB_TO_V = torch.tensor([460324, -385875, -74448]) / _FIXED_ONE
_LUMA_SCALE = 1220542 / _FIXED_ONE
_V_TO_R, _U_TO_G, _V_TO_G, _U_TO_B = (value / _FIXED_ONE for value in (1673527, -409993, -852492, 2116026))


def nv12_to_rgb_tensor(frames: torch.Tensor) -> torch.Tensor:
    """(n, H * 3 / 2, W) uint8 NV12 -> (n, H, W, 3) uint8 RGB on the frames' device, as cv2's COLOR_YUV2RGB_NV12:
    each chroma pair serves its 2x2 block, and luma below 16 counts as 16."""
    count, rows, width = frames.shape
    height = rows * 2 // 3
    luma = (frames[:, :height].float() - 16.0).clamp_min_(0.0).mul_(_LUMA_SCALE)
    chroma = frames[:, height:].reshape(count, height // 2, width // 2, 2).float() - 128.0
    chroma = chroma.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    u, v = chroma.unbind(-1)
    rgb = torch.stack([luma + _V_TO_R * v, luma + _U_TO_G * u + _V_TO_G * v, luma + _U_TO_B * u], dim=-1)
    return _to_uint8(rgb)


@functools.cache
def rgb_to_yuv_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The luma and chroma weights on the device, copied there once: a copy at each call (each pasted face's
    region) made the GPU worker wait for the device every time, 38% of its CPU on six faces a frame (run 16d)."""
    return _RGB_TO_Y.to(device), _RGB_TO_U.to(device), _RGB_TO_V.to(device)


def rgb_to_nv12_tensor(frames: torch.Tensor) -> torch.Tensor:
    """(n, H, W, 3) uint8 RGB (even H and W) -> (n, H * 3 / 2, W) uint8 NV12 on the frames' device, as cv2's
    COLOR_RGB2YUV_I420 with its chroma interleaved: chroma from each 2x2 block's top-left pixel."""
    count, height, width, _ = frames.shape
    rgb = frames.float()
    # Weighted sums elementwise, not matrix products, which TF32 would round (see the module's note).
    weights = rgb_to_yuv_tables(frames.device)
    luma = (rgb * weights[0]).sum(-1) + 16.0
    corners = rgb[:, ::2, ::2]
    chroma = torch.stack([(corners * weights[1]).sum(-1), (corners * weights[2]).sum(-1)], dim=-1) + 128.0
    return _to_uint8(torch.cat([luma, chroma.reshape(count, height // 2, width)], dim=1))


def _check_frames(frames: torch.Tensor) -> None:
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != torch.uint8 or not frames.is_contiguous():
        raise InvalidArgument(f"frames must be contiguous (n, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.round_().clamp_(0, 255).to(torch.uint8)


def shrink_batch(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, H, W, 3) uint8 frames -> (n, height, width, 3) uint8 for size = (width, height), by pixel-area
    averaging: for whole-number factors exactly the box means cv2.INTER_AREA takes."""
    _check_frames(frames)
    width, height = size
    if (height, width) == tuple(frames.shape[1:3]):
        return frames
    shrunk = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(height, width), mode="area")
    return _to_uint8(shrunk).permute(0, 2, 3, 1).contiguous()


def _grid_coefficients(matrices: np.ndarray, width: int, height: int) -> np.ndarray:
    """(m, 2, 3) maps into a (width, height) image -> the same maps into grid_sample's units.

    With align_corners=False grid_sample puts pixel i's centre at (2i + 1) / width - 1.
    """
    scale = np.array([2.0 / width, 2.0 / height])
    coefficients = np.asarray(matrices, np.float64) * scale[:, None]
    coefficients[..., 2] += scale / 2.0 - 1.0
    return coefficients.astype(np.float32)


def crop_to_frame(matrices: np.ndarray) -> np.ndarray:
    """(m, 2, 3) frame -> crop similarity maps inverted.

    In closed form, elementwise: numpy's inv and matmul go through BLAS, whose threads spun on every core
    of the GPU machine for these 2x2 matrices (an eighth of a worker's samples there).
    """
    forward = np.asarray(matrices, np.float64)
    a, b, shift_x = forward[:, 0, 0], forward[:, 0, 1], forward[:, 0, 2]
    c, d, shift_y = forward[:, 1, 0], forward[:, 1, 1], forward[:, 1, 2]
    determinant = a * d - b * c
    inverse = np.empty_like(forward)
    inverse[:, 0, 0], inverse[:, 0, 1] = d / determinant, -b / determinant
    inverse[:, 1, 0], inverse[:, 1, 1] = -c / determinant, a / determinant
    inverse[:, 0, 2] = -(inverse[:, 0, 0] * shift_x + inverse[:, 0, 1] * shift_y)
    inverse[:, 1, 2] = -(inverse[:, 1, 0] * shift_x + inverse[:, 1, 1] * shift_y)
    return inverse


def _sampling_grid(coefficients: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Grid points coefficients @ (x, y, 1) for every x of xs (..., W) and y of ys (..., H): (..., H, W, 2)."""
    along_x = xs[..., None, :, None] * coefficients[..., None, None, :, 0]
    along_y = ys[..., :, None, None] * coefficients[..., None, None, :, 1]
    return along_x + along_y + coefficients[..., None, None, :, 2]


def _ranks_in_frame(slots: np.ndarray) -> np.ndarray:
    """For each face, how many faces of the same frame come before it."""
    ranks = np.zeros(len(slots), np.int64)
    seen: dict[int, int] = {}
    for face, slot in enumerate(slots.tolist()):
        ranks[face] = seen.get(slot, 0)
        seen[slot] = ranks[face] + 1
    return ranks


def align_batch(frames: torch.Tensor, slots: Sequence[int], matrices: np.ndarray, size: int) -> torch.Tensor:
    """(n, H, W, 3) uint8 frames -> (m, size, size, 3) uint8 crops: face i cut from frames[slots[i]].

    matrices: (m, 2, 3) frame -> crop, as face_aligner.alignment_matrix gives them. Bilinear, and
    mirrored past the frame's edges like cv2.BORDER_REFLECT: grid_sample's reflection with
    align_corners=False mirrors about the outer edges of the border pixels, as BORDER_REFLECT does.
    """
    _check_frames(frames)
    if len(slots) == 0:
        return frames.new_zeros((0, size, size, 3))
    height, width = frames.shape[1:3]
    used, positions = np.unique(np.asarray(slots, np.int64), return_inverse=True)
    ranks = _ranks_in_frame(np.asarray(slots, np.int64))
    depth = int(ranks.max()) + 1
    # grid_sample pairs each input image with one grid, so a frame's faces are stacked down its grid,
    # `depth` crops tall; a frame with fewer faces samples its spare rows at the frame's centre.
    coefficients = np.zeros((len(used), depth, 2, 3), np.float32)
    coefficients[positions, ranks] = _grid_coefficients(crop_to_frame(matrices), width, height)
    device = frames.device
    pixel_centres = torch.arange(size, device=device, dtype=torch.float32)
    grid = _sampling_grid(torch.from_numpy(coefficients).to(device), pixel_centres, pixel_centres)
    source = frames if len(used) == len(frames) else frames.index_select(0, torch.from_numpy(used).to(device))
    sampled = F.grid_sample(
        source.permute(0, 3, 1, 2).float(),
        grid.view(len(used), depth * size, size, 2),
        mode="bilinear",
        padding_mode="reflection",
        align_corners=False,
    )
    stacked = sampled.view(len(used), 3, depth, size, size).permute(0, 2, 3, 4, 1).reshape(-1, size, size, 3)
    chosen = torch.from_numpy(positions * depth + ranks).to(device)
    return _to_uint8(stacked.index_select(0, chosen))


def paste_batch(
    frames: torch.Tensor, slots: Sequence[int], matrices: np.ndarray, crops: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Blends each swapped crop into its frame in place, as face_aligner.paste_back does; returns `frames`.

    crops: (m, S, S, 3) uint8 and masks: (m, S, S) float in [0, 1], on the frames' device. Each face
    touches only its paste_region; crop and mask are warped back bilinearly with zeros past the crop's
    edge. Faces of one frame are blended in order, so where two overlap the later one lies on top.
    """
    _check_frames(frames)
    height, width = frames.shape[1:3]
    size = crops.shape[1]
    boxes = [paste_region(matrix, size, height, width) for matrix in matrices]
    kept = np.array([face for face, box in enumerate(boxes) if box is not None], np.int64)
    if len(kept) == 0:
        return frames
    kept_slots = np.asarray(slots, np.int64)[kept]
    ranks = _ranks_in_frame(kept_slots)
    # Round r blends every frame's r-th face: no two faces of one round share a frame, so a round's
    # scatter never writes a pixel twice with different values.
    order = kept[np.argsort(ranks, kind="stable")]
    round_ends = np.cumsum(np.bincount(ranks)).tolist()
    corners = np.array([boxes[face] for face in order], np.int64)
    x0, y0, x1, y1 = corners.T
    tall, wide = int((y1 - y0).max()), int((x1 - x0).max())
    device = frames.device
    layout = torch.from_numpy(np.stack([np.asarray(slots, np.int64)[order], x0, y0, x1 - x0, y1 - y0, order])).to(
        device
    )
    slot, left, top, box_width, box_height, faces = layout.unbind(0)
    # Boxes are padded to the largest by repeating their last column and row: a padded position computes
    # and writes exactly what the position it repeats does.
    xs = left[:, None] + torch.minimum(torch.arange(wide, device=device)[None], box_width[:, None] - 1)
    ys = top[:, None] + torch.minimum(torch.arange(tall, device=device)[None], box_height[:, None] - 1)
    pixels = slot[:, None, None] * (height * width) + ys[:, :, None] * width + xs[:, None, :]
    coefficients = torch.from_numpy(_grid_coefficients(matrices[order], size, size)).to(device)
    grid = _sampling_grid(coefficients, xs.float(), ys.float())
    source = torch.cat(
        [crops.index_select(0, faces).permute(0, 3, 1, 2).float(), masks.index_select(0, faces)[:, None].float()], 1
    )
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    colour = warped[:, :3].permute(0, 2, 3, 1)
    alpha = warped[:, 3:].permute(0, 2, 3, 1)
    keep = (1.0 - alpha).clamp_min_(ALPHA_FLOOR)
    blended_colour = colour * alpha
    weight = alpha + keep + BLEND_EPSILON
    flat = frames.view(-1, 3)
    start = 0
    for end in round_ends:
        index = pixels[start:end]
        under = flat[index].float()
        flat[index] = _to_uint8((blended_colour[start:end] + under * keep[start:end]) / weight[start:end])
        start = end
    return frames


def _download_boxes(frames: torch.Tensor, slots: Sequence[int], matrices: np.ndarray, size: int, host: Frames) -> None:
    """Copies each face's paste region of the RGB `frames` into `host` (RGB, or NV12: converted on the device first)
    in one transfer: nothing else of a frame changed."""
    pixel_format, width, height = describe_frames(host)
    placed = [(slot, paste_region(matrix, size, height, width)) for slot, matrix in zip(slots, matrices, strict=True)]
    boxes = [(slot, box if pixel_format == "rgb24" else even_box(box)) for slot, box in placed if box is not None]
    if not boxes:
        return
    regions = [frames[slot : slot + 1, y0:y1, x0:x1] for slot, (x0, y0, x1, y1) in boxes]
    if pixel_format == "nv12":
        regions = [rgb_to_nv12_tensor(region) for region in regions]
    values = torch.cat([region.reshape(-1) for region in regions]).cpu().numpy()
    start = 0
    for slot, (x0, y0, x1, y1) in boxes:
        box_height, box_width = y1 - y0, x1 - x0
        if pixel_format == "rgb24":
            end = start + box_height * box_width * 3
            host[slot, y0:y1, x0:x1] = values[start:end].reshape(box_height, box_width, 3)
        else:
            middle, end = start + box_height * box_width, start + box_height * box_width * 3 // 2
            host[slot, y0:y1, x0:x1] = values[start:middle].reshape(box_height, box_width)
            chroma_rows = slice(height + y0 // 2, height + y1 // 2)
            host[slot, chroma_rows, x0:x1] = values[middle:end].reshape(box_height // 2, box_width)
        start = end


class DeviceCropCodec:
    """Crops as uint8 tensors on the warper's device: the swapper's FP16 target is made there and only it
    comes down; the model's answer goes up as it came and becomes crops and masks there. The values are
    exactly face_swapper.HostCropCodec's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def pack_target(self, crops: torch.Tensor) -> np.ndarray:
        unit = crops.permute(0, 3, 1, 2).float().div_(255.0).half()
        return unit.contiguous().cpu().numpy()

    def unpack(self, swapped: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # torch shares a numpy array's memory, so a read-only answer (gRPC's) is copied first.
        colour = torch.from_numpy(np.require(swapped, requirements=("C", "W"))).to(self.device)
        weight = torch.from_numpy(np.require(mask, requirements=("C", "W"))).to(self.device)
        if not bool(torch.isfinite(colour).all()) or not bool(torch.isfinite(weight).all()):
            raise non_finite_outputs()
        pixels = colour.float().permute(0, 2, 3, 1).mul_(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)
        return pixels.contiguous(), weight[:, 0].float().clamp_(0.0, 1.0)

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(parts))


class DeviceAlignedFaces:
    """A batch's face crops cut on the device; the frames and crops stay there until the faces are pasted."""

    def __init__(
        self, host: Frames, frames: torch.Tensor, slots: Sequence[int], matrices: np.ndarray, crops: torch.Tensor
    ) -> None:
        self._host = host
        self._frames = frames
        self._slots = list(slots)
        self._matrices = matrices
        self.crops = crops

    def paste(self, swapped: Any, masks: Any) -> Frames:
        paste_batch(self._frames, self._slots, self._matrices, self._on_device(swapped), self._on_device(masks))
        _download_boxes(self._frames, self._slots, self._matrices, self.crops.shape[1], self._host)
        return self._host

    def _on_device(self, values: torch.Tensor | np.ndarray) -> torch.Tensor:
        tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(values))
        return tensor.to(self._frames.device)


class TorchFaceWarper:
    """shrink_batch, align_batch and paste_batch on one device: a batch's frames go up once (for detection),
    its crops stay there for the swapper's conversions, and after the paste only the faces' regions come
    back into the host frames. It takes RGB and NV12 frames, and asks for NV12."""

    pixel_format: PixelFormat = "nv12"

    def __init__(self, device: str | torch.device, resident_batches: int = KEPT_BATCHES) -> None:
        self.device = torch.device(device)
        self.crop_codec = DeviceCropCodec(self.device)
        self._resident: KeptBatches[torch.Tensor] = KeptBatches(resident_batches)

    @property
    def resident_batches(self) -> int:
        """Batches uploaded for detection and not yet aligned."""
        return len(self._resident)

    def shrink(self, frames: Frames, size: tuple[int, int]) -> Frames:
        pixel_format, width, height = describe_frames(frames)
        if pixel_format == "rgb24" and (width, height) == size:
            return frames
        on_device = self._upload(frames)
        self._resident.keep(frames, on_device)
        return shrink_batch(on_device, size).cpu().numpy()

    def align(
        self, frames: Frames, slots: Sequence[int], matrices: np.ndarray, size: int
    ) -> HostAlignedFaces | DeviceAlignedFaces:
        on_device = self._resident.take(frames)
        if len(slots) == 0:
            return HostAlignedFaces(frames, slots, matrices, np.zeros((0, size, size, 3), np.uint8))
        host = frames if frames.flags.writeable else frames.copy()
        if on_device is None:
            on_device = self._upload(host)
        return DeviceAlignedFaces(host, on_device, slots, matrices, align_batch(on_device, slots, matrices, size))

    def _upload(self, frames: Frames) -> torch.Tensor:
        """The frames on the device as (n, H, W, 3) RGB."""
        tensor = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            # From page-locked memory the copy runs at the link's full speed, beside the thread's next work.
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        elif frames.ndim == 4:
            # A copy even on the CPU, so the host frames change only where faces are copied back, as on a GPU.
            tensor = tensor.to(self.device, copy=True)
        return nv12_to_rgb_tensor(tensor) if frames.ndim == 3 else tensor

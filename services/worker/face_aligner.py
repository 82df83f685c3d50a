"""Warps faces onto the canonical crop by their landmarks, and the swapped crop back into the frame.

`Cv2FaceWarper` does it for the chunk pipeline on the CPU, one face at a time with OpenCV; its twin
on torch tensors (`batch_warp.TorchFaceWarper`) does a whole batch at once where the frames can sit in
GPU memory. Both paste into the same region of the frame (`paste_region`), and both take NV12 frames: faces are
cut and pasted in RGB, and only the faces' regions (grown to whole chroma pairs, `even_box`) go back as NV12.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import cv2
import numpy as np

from services.common.face_geometry import CROP_SIZE, FIVE_POINT_TEMPLATE, template_points
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import PixelFormat, describe_frames, nv12_to_rgb, rgb_to_nv12
from services.worker.face_swapper import HOST_CROPS, HostCropCodec

# Batches a warper keeps between shrinking them for detection and aligning their faces: a few a chunk in flight.
KEPT_BATCHES = 8
KeptT = TypeVar("KeptT")
Box = tuple[int, int, int, int]

# (frames, (width, height)) -> the frames resized to that size, for detection.
FrameShrinker = Callable[[Frames, tuple[int, int]], Frames]


@dataclass(frozen=True)
class AlignedFace:
    crop: np.ndarray  # (size, size, 3) uint8 RGB
    matrix: np.ndarray  # (2, 3) float32: frame -> crop


def alignment_matrix(
    landmarks: np.ndarray, size: int = CROP_SIZE, template: np.ndarray = FIVE_POINT_TEMPLATE
) -> np.ndarray:
    """Similarity transform (rotation, uniform scale, shift) taking the five landmarks onto the template."""
    target = template_points(size, template)
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), target, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("landmarks are degenerate; no similarity transform fits them")
    return matrix.astype(np.float32)


def warp_to_crop(frame: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The (size, size, 3) crop that `matrix` (frame -> crop) cuts out of `frame`, mirrored past its edges."""
    return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def align_face(
    frame: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE, template: np.ndarray = FIVE_POINT_TEMPLATE
) -> AlignedFace:
    matrix = alignment_matrix(landmarks, size, template)
    return AlignedFace(crop=warp_to_crop(frame, matrix, size), matrix=matrix)


def downscale_frames(frames: Frames, size: tuple[int, int]) -> Frames:
    """The frames shrunk to (width, height) by pixel-area averaging; the frames themselves at their own size."""
    width, height = size
    if (height, width) == frames.shape[1:3]:
        return frames
    return np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in frames])


def paste_region(matrix: np.ndarray, size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end exclusive: the frame pixels a crop of `size` pasted by `matrix` can touch.

    The crop's footprint grown to whole pixels plus one (bilinear reach), clipped to the frame; None
    when it lies wholly outside.
    """
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float32)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    x0 = max(int(np.floor(mapped[:, 0].min())), 0)
    y0 = max(int(np.floor(mapped[:, 1].min())), 0)
    x1 = min(int(np.ceil(mapped[:, 0].max())) + 1, width)
    y1 = min(int(np.ceil(mapped[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def paste_back(frame: np.ndarray, swapped: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> Box | None:
    """Blends the swapped crop into `frame` in place, touching only the face's bounding region, which it returns
    (None when the crop lies wholly outside the frame).

    swapped: (size, size, 3) uint8 RGB; mask: (size, size) float32 in [0, 1].
    """
    region_box = paste_region(matrix, swapped.shape[0], frame.shape[0], frame.shape[1])
    if region_box is None:
        return None
    x0, y0, x1, y1 = region_box
    region_inverse = cv2.invertAffineTransform(matrix).astype(np.float32)
    region_inverse[:, 2] = region_inverse[:, 2] - np.array([x0, y0], np.float32)
    region_size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(swapped, region_inverse, region_size, flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(mask.astype(np.float32), region_inverse, region_size, flags=cv2.INTER_LINEAR)
    region = frame[y0:y1, x0:x1]
    # blendLinear normalises by the weight sum; the floor keeps it defined where both are zero.
    frame[y0:y1, x0:x1] = cv2.blendLinear(warped, region, alpha, np.maximum(1.0 - alpha, 1e-6))
    return region_box


def even_box(box: Box) -> Box:
    """The box grown to even corners, so that it covers whole NV12 chroma pairs (the frame's sides are even)."""
    x0, y0, x1, y1 = box
    return x0 - x0 % 2, y0 - y0 % 2, x1 + x1 % 2, y1 + y1 % 2


def write_rgb_region(nv12: Frames, rgb: Frames, box: Box) -> None:
    """Writes one RGB frame's pixels inside `box` (even corners) into the same frame as NV12, as rgb_to_nv12
    converts them: luma rows, then the chroma rows below."""
    x0, y0, x1, y1 = box
    height = rgb.shape[0]
    region = rgb_to_nv12(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
    rows = y1 - y0
    nv12[y0:y1, x0:x1] = region[:rows]
    nv12[height + y0 // 2 : height + y1 // 2, x0:x1] = region[rows:]


class KeptBatches(Generic[KeptT]):
    """What a warper made of a batch when it shrank it (its RGB, or its upload), kept until its faces are aligned.

    Keyed by the frames' identity: an id may be reused once the array it named is gone, so the frames are kept
    too and compared. The oldest go first past `limit` (a batch whose chunk failed is never aligned)."""

    def __init__(self, limit: int = KEPT_BATCHES) -> None:
        self._kept: OrderedDict[int, tuple[Frames, KeptT]] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    def keep(self, frames: Frames, made: KeptT) -> None:
        with self._lock:
            self._kept[id(frames)] = (frames, made)
            while len(self._kept) > self._limit:
                self._kept.popitem(last=False)

    def take(self, frames: Frames) -> KeptT | None:
        with self._lock:
            kept = self._kept.pop(id(frames), None)
        return kept[1] if kept is not None and kept[0] is frames else None


class HostAlignedFaces:
    """A batch's face crops cut on the host; pastes back into the batch's own frames, in place.

    For NV12 frames `rgb` holds the batch as RGB (the warper's own copy): faces are pasted there, and each face's
    region goes back into the NV12 frames."""

    def __init__(
        self, frames: Frames, slots: Sequence[int], matrices: np.ndarray, crops: np.ndarray, rgb: Frames | None = None
    ) -> None:
        self._frames = frames
        self._slots = list(slots)
        self._matrices = matrices
        self.crops = crops
        self._rgb = rgb

    def paste(self, swapped: np.ndarray, masks: np.ndarray) -> Frames:
        frames = self._frames if self._frames.flags.writeable else self._frames.copy()
        pasted = frames if self._rgb is None else self._rgb
        for slot, matrix, crop, mask in zip(self._slots, self._matrices, swapped, masks, strict=True):
            box = paste_back(pasted[slot], crop, mask, matrix)
            # A later face of the frame changes only pixels inside its own box, which is written back after it.
            if self._rgb is not None and box is not None:
                write_rgb_region(frames[slot], self._rgb[slot], even_box(box))
        return frames


class Cv2FaceWarper:
    """OpenCV, one face at a time on the host: the faster choice where there is no GPU.

    It takes RGB and NV12 frames, and asks for NV12: half RGB's bytes on each hop, and no colour conversion in the
    decoder or the encoder. NV12 frames become RGB once, when they are shrunk for detection; that RGB is kept for
    cutting the faces out and pasting them back, and only the faces' regions go back into the NV12 frames."""

    crop_codec: HostCropCodec = HOST_CROPS
    pixel_format: PixelFormat = "nv12"

    def __init__(self, kept_batches: int = KEPT_BATCHES) -> None:
        self._rgb: KeptBatches[Frames] = KeptBatches(kept_batches)

    @property
    def kept_batches(self) -> int:
        """NV12 batches shrunk for detection and not yet aligned."""
        return len(self._rgb)

    def shrink(self, frames: Frames, size: tuple[int, int]) -> Frames:
        if describe_frames(frames)[0] == "rgb24":
            return downscale_frames(frames, size)
        rgb = nv12_to_rgb(frames)
        self._rgb.keep(frames, rgb)
        return downscale_frames(rgb, size)

    def align(self, frames: Frames, slots: Sequence[int], matrices: np.ndarray, size: int) -> HostAlignedFaces:
        rgb = None
        if describe_frames(frames)[0] == "nv12":
            rgb = self._rgb.take(frames)
            if rgb is None:
                rgb = nv12_to_rgb(frames)
        source = frames if rgb is None else rgb
        crops = [warp_to_crop(source[slot], matrix, size) for slot, matrix in zip(slots, matrices, strict=True)]
        stacked = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
        return HostAlignedFaces(frames, slots, matrices, stacked, rgb)

"""Warps faces onto the canonical crop by their landmarks, and the swapped crop back into the frame."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from services.common.face_geometry import CROP_SIZE, template_points


@dataclass(frozen=True)
class AlignedFace:
    crop: np.ndarray  # (size, size, 3) uint8 RGB
    matrix: np.ndarray  # (2, 3) float32: frame -> crop


def alignment_matrix(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Similarity transform (rotation, uniform scale, shift) taking the five landmarks onto the template."""
    matrix, _ = cv2.estimateAffinePartial2D(
        landmarks.astype(np.float32), template_points(size), method=cv2.LMEDS
    )
    if matrix is None:
        raise ValueError("landmarks are degenerate; no similarity transform fits them")
    return matrix.astype(np.float32)


def align_face(frame: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> AlignedFace:
    matrix = alignment_matrix(landmarks, size)
    crop = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return AlignedFace(crop=crop, matrix=matrix)


def paste_back(frame: np.ndarray, swapped: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> None:
    """Blends the swapped crop into `frame` in place, touching only the face's bounding region.

    swapped: (size, size, 3) uint8 RGB; mask: (size, size) float32 in [0, 1].
    """
    size = swapped.shape[0]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float32)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    height, width = frame.shape[:2]
    x0 = max(int(np.floor(mapped[:, 0].min())), 0)
    y0 = max(int(np.floor(mapped[:, 1].min())), 0)
    x1 = min(int(np.ceil(mapped[:, 0].max())) + 1, width)
    y1 = min(int(np.ceil(mapped[:, 1].max())) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return
    region_inverse = inverse.astype(np.float32)
    region_inverse[:, 2] = region_inverse[:, 2] - np.array([x0, y0], np.float32)
    region_size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(swapped, region_inverse, region_size, flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(mask.astype(np.float32), region_inverse, region_size, flags=cv2.INTER_LINEAR)
    region = frame[y0:y1, x0:x1]
    # blendLinear normalises by the weight sum; the floor keeps it defined where both are zero.
    frame[y0:y1, x0:x1] = cv2.blendLinear(warped, region, alpha, np.maximum(1.0 - alpha, 1e-6))

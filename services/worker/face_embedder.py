"""A face descriptor computed in-process from the aligned inner face, for the reference selector.

The default is classical and needs no downloaded weights: uniform local binary patterns (LBP,
8 neighbours at radius 1) histogrammed over an 8x8 grid of cells on a grey, histogram-equalised,
lightly blurred 128x128 crop of the inner face (ArcFace's crop), each cell's histogram
square-rooted (Hellinger) and the whole vector L2-normalised, compared by cosine distance. It
tells apart the people of one video well when they are seen from the front; it is not a face
recogniser across photos, ages or poses. Production model sets replace it with ArcFace
(w600k_r50) behind the same two functions.
"""

from __future__ import annotations

import cv2
import numpy as np

from services.common.face_geometry import ALIGN_SCALE, FIVE_POINT_TEMPLATE

DESCRIPTOR_CROP_SIZE = 128
GRID_CELLS = 8
# The inner face: the worker's template zoomed back in past its margin to ArcFace's own crop, so
# hair and background (which change with the shot, not the person) mostly stay out.
INNER_FACE_ZOOM = 1.0 / ALIGN_SCALE
# The blur makes the patterns describe facial structure rather than pixel noise and resampling,
# which differ between a small face scaled up and a large one scaled down.
BLUR_SIGMA = 2.0
# Cosine distance below which two descriptors are taken for the same person. Measured on the
# astronaut and Grace Hopper photos: one photo against itself scaled 0.35x to 1.6x, rotated 8
# degrees, 60 levels lighter or darker and with landmark jitter stays below 0.18; the two people
# stay above 0.33 under the same changes (tests/worker/test_face_selector.py).
SAME_FACE_DISTANCE = 0.25

_NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _uniform_pattern_labels() -> np.ndarray:
    """Maps each 8-bit LBP code to one of 58 uniform patterns (at most two 0/1 transitions) or 58."""
    labels = np.full(256, 58, np.int64)
    next_label = 0
    for code in range(256):
        bits = [(code >> bit) & 1 for bit in range(8)]
        transitions = sum(bits[bit] != bits[(bit + 1) % 8] for bit in range(8))
        if transitions <= 2:
            labels[code] = next_label
            next_label += 1
    return labels


_UNIFORM_LABELS = _uniform_pattern_labels()
PATTERN_BINS = 59


def inner_face_template(size: int = DESCRIPTOR_CROP_SIZE) -> np.ndarray:
    unit = (FIVE_POINT_TEMPLATE - 0.5) * np.float32(INNER_FACE_ZOOM) + 0.5
    return (unit * np.float32(size)).astype(np.float32)


def inner_face_crop(frame: np.ndarray, landmarks: np.ndarray, size: int = DESCRIPTOR_CROP_SIZE) -> np.ndarray:
    """The grey, histogram-equalised, blurred inner face, (size, size) uint8."""
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), inner_face_template(size), method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("landmarks are degenerate; no similarity transform fits them")
    crop = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    grey = cv2.equalizeHist(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY))
    return cv2.GaussianBlur(grey, (0, 0), BLUR_SIGMA)


def uniform_lbp(grey: np.ndarray) -> np.ndarray:
    """Uniform-pattern label (0..58) of every interior pixel, shape (H-2, W-2)."""
    height, width = grey.shape
    centre = grey[1:-1, 1:-1]
    codes = np.zeros(centre.shape, np.int64)
    for bit, (dy, dx) in enumerate(_NEIGHBOUR_OFFSETS):
        neighbour = grey[1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx]
        codes |= (neighbour >= centre).astype(np.int64) << bit
    return _UNIFORM_LABELS[codes]


def lbp_descriptor(grey: np.ndarray, cells: int = GRID_CELLS) -> np.ndarray:
    """Grid of uniform-LBP histograms, Hellinger-mapped and L2-normalised, float32 (cells*cells*59,)."""
    labels = uniform_lbp(grey)
    height, width = labels.shape
    rows = np.minimum(np.arange(height) * cells // height, cells - 1)
    columns = np.minimum(np.arange(width) * cells // width, cells - 1)
    cell_index = rows[:, None] * cells + columns[None, :]
    counts = np.bincount((cell_index * PATTERN_BINS + labels).ravel(), minlength=cells * cells * PATTERN_BINS)
    histograms = counts.reshape(cells * cells, PATTERN_BINS).astype(np.float64)
    histograms /= np.maximum(histograms.sum(axis=1, keepdims=True), 1.0)
    vector = np.sqrt(histograms).ravel()
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def face_descriptor(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The descriptor of the face at `landmarks` (5, 2) in an RGB frame."""
    return lbp_descriptor(inner_face_crop(frame, landmarks))


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine distance of two L2-normalised descriptors: 0 for the same, up to 1 for unrelated."""
    return float(1.0 - np.dot(a.astype(np.float64), b.astype(np.float64)))

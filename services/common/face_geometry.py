"""The canonical face crop shared by the aligner (worker) and the swapper model (model build).

Faces are aligned by a similarity transform of their five landmarks onto FIVE_POINT_TEMPLATE,
given in units of the crop side so any crop size can use it. The template is ArcFace's 112-pixel
template pulled toward the centre (ALIGN_SCALE) so the crop keeps forehead, jaw and some
background: the blend needs context around the face to feather into.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CROP_SIZE = 256

_ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ALIGN_SCALE = 0.62
FIVE_POINT_TEMPLATE = (0.5 + (_ARCFACE_112 / 112.0 - 0.5) * ALIGN_SCALE).astype(np.float32)

# The region the swap replaces, an ellipse in crop units: brows to chin, cheek to cheek.
MASK_CENTER = (0.5, 0.615)
MASK_AXES = (0.205, 0.24)
# Feather width of the mask edge, in crop units.
MASK_FEATHER = 0.045


def template_points(size: int = CROP_SIZE, template: np.ndarray = FIVE_POINT_TEMPLATE) -> np.ndarray:
    """The template's five points in a crop of `size` pixels."""
    return (template * np.float32(size)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class CropLayout:
    """A square crop of `size` pixels with the five landmarks placed at `template` (5, 2), in crop units."""

    size: int
    template: np.ndarray = field(default_factory=lambda: FIVE_POINT_TEMPLATE)

"""The default face swapper: carries the aligned source face onto the aligned target face, in FP16.

No pretrained neural swapper can be fetched here, so the default model is a fixed image operator
exported as ONNX. Both inputs are crops aligned by their five landmarks onto the same canonical
template (services.common.face_geometry), so the source's eyes, nose and mouth already sit where
the target's are; what remains is to make the source skin look lit like the target and to blend it
in without a seam:

1. colour: in YCbCr, the source's masked per-channel mean and standard deviation are matched to
   the target's (the std ratio is clamped so a flat or blown-out target cannot erase the source's
   features);
2. lighting: the ratio (luma) and difference (chroma) of the target's and the source's local masked
   means on a coarse grid, smoothed and resized back up, is applied to the source, so shading
   direction and colour casts across the face follow the target while the source keeps every
   detail finer than the grid;
3. blending: the result is blended into the target crop with the feathered face ellipse.

Outputs: `swapped` (the blended crop) and `mask`, the paste-back weight: the blend ellipse widened
by one feather width, so that wherever the blend used any source the paste weight is 1 and the final
frame carries exactly the blend's weighting, and the crop edge fades into the frame outside it.

Numerics are kept FP16-safe: every tensor stays within a few units, reductions are means (never
sums), and epsilons are at least 1e-2 where they guard a division.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.common.face_geometry import CROP_SIZE, MASK_AXES, MASK_CENTER, MASK_FEATHER

SwapperPrecision = Literal["fp16", "fp32"]
SWAPPER_PRECISIONS: tuple[SwapperPrecision, ...] = ("fp16", "fp32")

ONNX_OPSET = 17
INPUT_NAMES = ("target", "source")
OUTPUT_NAMES = ("swapped", "mask")

# Coarse lighting grid: cells of LIGHTING_CELL pixels; the ratio field is smoothed over
# LIGHTING_SMOOTH cells, so only variation broader than about a third of the face is transferred.
LIGHTING_CELL = 16
LIGHTING_SMOOTH = 3
# Guards the local-mean ratio where the mask barely covers a cell (the ratio falls back to 1).
LIGHTING_EPSILON = 0.02
LIGHTING_RATIO_RANGE = (0.25, 4.0)
STD_EPSILON = 0.02
STD_RATIO_RANGE = (0.5, 2.0)

_TORCH_DTYPES: dict[SwapperPrecision, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}


def _smoothstep(edge0: float, edge1: float, values: np.ndarray) -> np.ndarray:
    t = np.clip((values - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse_inside_distance(size: int) -> np.ndarray:
    """Approximate signed distance (crop units) to the mask ellipse, positive inside."""
    coordinates = (np.arange(size, dtype=np.float64) + 0.5) / size
    y, x = np.meshgrid(coordinates, coordinates, indexing="ij")
    normalised = np.sqrt(((x - MASK_CENTER[0]) / MASK_AXES[0]) ** 2 + ((y - MASK_CENTER[1]) / MASK_AXES[1]) ** 2)
    return (1.0 - normalised) * min(MASK_AXES)


def blend_mask(size: int = CROP_SIZE) -> np.ndarray:
    """(size, size) float32: 1 well inside the face ellipse, 0.5 on it, 0 one half-feather outside."""
    distance = _ellipse_inside_distance(size)
    return _smoothstep(-MASK_FEATHER / 2, MASK_FEATHER / 2, distance).astype(np.float32)


def paste_mask(size: int = CROP_SIZE) -> np.ndarray:
    """(size, size) float32: 1 wherever blend_mask is non-zero, fading to 0 over one more feather width."""
    distance = _ellipse_inside_distance(size)
    return _smoothstep(-1.5 * MASK_FEATHER, -MASK_FEATHER / 2, distance).astype(np.float32)


def _to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    red, green, blue = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    blue_difference = (blue - luma) * 0.564
    red_difference = (red - luma) * 0.713
    return torch.cat([luma, blue_difference, red_difference], dim=1)


def _to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    luma, blue_difference, red_difference = ycbcr[:, 0:1], ycbcr[:, 1:2], ycbcr[:, 2:3]
    red = luma + 1.403 * red_difference
    green = luma - 0.714 * red_difference - 0.344 * blue_difference
    blue = luma + 1.773 * blue_difference
    return torch.cat([red, green, blue], dim=1)


class FaceSwapper(nn.Module):
    def __init__(self, size: int = CROP_SIZE) -> None:
        super().__init__()
        self.register_buffer("blend_weight", torch.from_numpy(blend_mask(size))[None, None])
        self.register_buffer("paste_weight", torch.from_numpy(paste_mask(size))[None, None])
        self.register_buffer("blend_weight_mean", self.blend_weight.mean())
        self.register_buffer("cell_weight", F.avg_pool2d(self.blend_weight, LIGHTING_CELL, LIGHTING_CELL))

    def _masked_mean(self, values: torch.Tensor) -> torch.Tensor:
        return (values * self.blend_weight).mean(dim=(2, 3), keepdim=True) / self.blend_weight_mean

    def _match_colour(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        source_mean = self._masked_mean(source)
        target_mean = self._masked_mean(target)
        source_std = torch.sqrt(self._masked_mean((source - source_mean) ** 2) + STD_EPSILON**2)
        target_std = torch.sqrt(self._masked_mean((target - target_mean) ** 2) + STD_EPSILON**2)
        scale = torch.clamp(target_std / source_std, *STD_RATIO_RANGE)
        return (source - source_mean) * scale + target_mean

    def _local_means(self, values: torch.Tensor) -> torch.Tensor:
        """Masked local sums on the coarse grid, divided by the cell area (not by the mask weight:
        in a ratio of two such means the mask weight cancels)."""
        return F.avg_pool2d(values * self.blend_weight, LIGHTING_CELL, LIGHTING_CELL)

    def _smooth_up(self, field: torch.Tensor, size: int) -> torch.Tensor:
        smoothed = F.avg_pool2d(
            field, LIGHTING_SMOOTH, stride=1, padding=LIGHTING_SMOOTH // 2, count_include_pad=False
        )
        return F.interpolate(smoothed, size=(size, size), mode="bilinear", align_corners=False)

    def _match_lighting(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        size = source.shape[-1]
        source_local = self._local_means(source)
        target_local = self._local_means(target)
        luma_ratio = (target_local[:, 0:1] + LIGHTING_EPSILON) / (source_local[:, 0:1] + LIGHTING_EPSILON)
        luma_ratio = torch.clamp(luma_ratio, *LIGHTING_RATIO_RANGE)
        # Dividing by the cell's mask weight makes this a difference of masked means; where the mask
        # barely covers a cell both sums are near 0 and so is the shift.
        chroma_shift = (target_local[:, 1:3] - source_local[:, 1:3]) / (self.cell_weight + LIGHTING_EPSILON)
        luma = source[:, 0:1] * self._smooth_up(luma_ratio, size)
        chroma = source[:, 1:3] + self._smooth_up(chroma_shift, size)
        return torch.cat([luma, chroma], dim=1)

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target_ycbcr = _to_ycbcr(target)
        source_ycbcr = self._match_colour(_to_ycbcr(source), target_ycbcr)
        relit = _to_rgb(self._match_lighting(source_ycbcr, target_ycbcr)).clamp(0.0, 1.0)
        swapped = target + (relit - target) * self.blend_weight
        mask = self.paste_weight.expand(target.shape[0], 1, -1, -1)
        return swapped, mask


def new_swapper(precision: SwapperPrecision = "fp16") -> FaceSwapper:
    return FaceSwapper().to(_TORCH_DTYPES[precision]).eval()


def example_inputs(precision: SwapperPrecision, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 3, CROP_SIZE, CROP_SIZE)
    dtype = _TORCH_DTYPES[precision]
    return torch.rand(shape, generator=generator).to(dtype), torch.rand(shape, generator=generator).to(dtype)


def export_swapper(path: Path, precision: SwapperPrecision = "fp16") -> None:
    """Writes the swapper as ONNX (opset 17, dynamic batch) computing in `precision`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch_axis = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            new_swapper(precision),
            example_inputs(precision),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: batch_axis for name in (*INPUT_NAMES, *OUTPUT_NAMES)},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )

"""The default face swapper: carries the aligned source face onto the aligned target face, in FP16.

No pretrained neural swapper can be fetched here, so the default model is a fixed image operator
exported as ONNX. Both inputs are crops aligned by their five landmarks onto the same canonical
template (services.common.face_geometry), so the source's eyes, nose and mouth already sit where
the target's are; what remains is to make the source face look lit like the target and to blend it
in without a seam:

1. contrast: the source's detail about its masked mean is scaled so that its luma contrast relative
   to its brightness matches the target's (harsh versus soft light), within a narrow clamp so a flat
   or blown-out target cannot erase the source's features;
2. colour and lighting: each RGB channel of the source is multiplied by the ratio of the target's to
   the source's masked local mean on a coarse grid (smoothed, resized back up). That one gain field
   carries the target's brightness, colour cast and shading direction, while the source keeps every
   detail finer than the grid, scaled the way real skin is under that light. A multiplicative gain
   rather than mean/std matching with additive chroma shifts, because additive chroma on a dark
   target pushes the source's saturated parts (lips, glasses) out of gamut;
3. blending: the result is blended into the target crop with the feathered face ellipse.

Outputs: `swapped` (the blended crop) and `mask`, the paste-back weight: the blend ellipse widened
by one feather width, so that wherever the blend used any source the paste weight is 1 and the final
frame carries exactly the blend's weighting, while the crop edge fades into the frame outside it.

Numerics are kept FP16-safe: every value stays within a few units; every mean is taken in two
stages (LIGHTING_CELL-square average pools, then a mean over the few hundred cells) so that no
accumulator ever holds a sum near FP16's 65504 even where a reduction accumulates in FP16; epsilons
guarding divisions are at least 1e-2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import InvalidArgument
from services.common.face_geometry import CROP_SIZE, MASK_AXES, MASK_CENTER, MASK_FEATHER

SwapperPrecision = Literal["fp16", "fp32"]
SWAPPER_PRECISIONS: tuple[SwapperPrecision, ...] = ("fp16", "fp32")

ONNX_OPSET = 17
INPUT_NAMES = ("target", "source")
OUTPUT_NAMES = ("swapped", "mask")

# Coarse lighting grid: cells of LIGHTING_CELL pixels, smoothed over LIGHTING_SMOOTH cells, so only
# variation broader than about a third of the face is taken from the target.
LIGHTING_CELL = 16
LIGHTING_SMOOTH = 3
# Intensity floor (in 0..1 units) in the gain ratio: keeps a near-black source pixel region from
# being amplified into noise, and is well above FP16's resolution near zero.
INTENSITY_EPSILON = 0.02
WEIGHT_EPSILON = 0.01
GAIN_RANGE = (0.05, 8.0)
STD_EPSILON = 0.01
CONTRAST_RATIO_RANGE = (0.67, 1.5)

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


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]


class FaceSwapper(nn.Module):
    blend_weight: torch.Tensor
    paste_weight: torch.Tensor
    blend_weight_mean: torch.Tensor
    smoothed_cell_weight: torch.Tensor

    def __init__(self, size: int = CROP_SIZE) -> None:
        super().__init__()
        weight = torch.from_numpy(blend_mask(size))[None, None]
        self.register_buffer("blend_weight", weight)
        self.register_buffer("paste_weight", torch.from_numpy(paste_mask(size))[None, None])
        self.register_buffer("blend_weight_mean", weight.mean())
        self.register_buffer("smoothed_cell_weight", self._smooth(F.avg_pool2d(weight, LIGHTING_CELL)))
        self.size = size

    def _masked_mean(self, values: torch.Tensor) -> torch.Tensor:
        cell_means = F.avg_pool2d(values * self.blend_weight, LIGHTING_CELL)
        return cell_means.mean(dim=(2, 3), keepdim=True) / self.blend_weight_mean

    def _relative_contrast(self, rgb: torch.Tensor) -> torch.Tensor:
        luma = _luma(rgb)
        mean = self._masked_mean(luma)
        std = torch.sqrt(self._masked_mean((luma - mean) ** 2) + STD_EPSILON**2)
        return std / (mean + INTENSITY_EPSILON)

    def _match_contrast(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scales the source's detail about its masked mean so its contrast relative to its brightness
        matches the target's (harsh versus soft light); brightness and colour are left to the gains."""
        scale = torch.clamp(self._relative_contrast(target) / self._relative_contrast(source), *CONTRAST_RATIO_RANGE)
        mean = self._masked_mean(source)
        return mean + (source - mean) * scale

    @staticmethod
    def _smooth(field: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(field, LIGHTING_SMOOTH, stride=1, padding=LIGHTING_SMOOTH // 2, count_include_pad=False)

    def _local_means(self, rgb: torch.Tensor) -> torch.Tensor:
        """Masked local means on the coarse grid by normalised convolution: cells the mask barely
        covers borrow from their neighbours instead of dividing a small sum by a small weight."""
        sums = self._smooth(F.avg_pool2d(rgb * self.blend_weight, LIGHTING_CELL))
        return sums / (self.smoothed_cell_weight + WEIGHT_EPSILON)

    def _match_lighting(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Multiplies each channel by the ratio of the target's to the source's local means: the
        illumination (brightness, colour cast, shading direction) becomes the target's, while the
        source's reflectance detail finer than the grid is kept, scaled like real skin under that light."""
        gain = (self._local_means(target) + INTENSITY_EPSILON) / (self._local_means(source) + INTENSITY_EPSILON)
        gain = torch.clamp(gain, *GAIN_RANGE)
        return source * F.interpolate(gain, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        relit = self._match_lighting(self._match_contrast(source, target), target).clamp(0.0, 1.0)
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
    """Writes the swapper as ONNX (opset 17, dynamic batch) computing in `precision`: "fp16" is the
    served model, "fp32" its twin for GPUs without fast FP16 and for checking FP16's accuracy."""
    if precision not in SWAPPER_PRECISIONS:
        raise InvalidArgument(f"swapper precision {precision!r} is not one of {', '.join(SWAPPER_PRECISIONS)}")
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

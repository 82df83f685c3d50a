"""The face models a job may name, and what the pipeline must know to run each: the one list that the
gateway checks job specs against, the worker runs swappers from, and the importer (services/model_build)
builds contracts on.

The built-in set needs no weights: the MTCNN cascade and the crop-to-crop `face_swapper`. The rest are
the FaceFusion models a user imports (`swapline models import`), served under FaceFusion's file stems.
Their geometry and pixel ranges follow FaceFusion's public code (face_helper.WARP_TEMPLATE_SET,
face_swapper/core.py's prepare_crop_frame and normalize_crop_frame, face_recognizer.py).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeVar

import numpy as np

from services.common.errors import InvalidArgument

# The built-in models come first: an empty name means them.
SwapperName = Literal["face_swapper", "inswapper_128", "hyperswap_1a_256", "hyperswap_1b_256", "hyperswap_1c_256"]
SWAPPER_NAMES: tuple[SwapperName, ...] = typing.get_args(SwapperName)
DetectorName = Literal["mtcnn", "yoloface_8n", "scrfd_2.5g", "retinaface_10g"]
DETECTOR_NAMES: tuple[DetectorName, ...] = typing.get_args(DetectorName)
BUILT_IN_SWAPPER: SwapperName = SWAPPER_NAMES[0]
BUILT_IN_DETECTOR: DetectorName = DETECTOR_NAMES[0]

# FaceFusion's five-point warp templates, by the names its model sets use.
WarpTemplate = Literal["arcface_128", "arcface_112_v2"]
WARP_TEMPLATE_NAMES: tuple[WarpTemplate, ...] = typing.get_args(WarpTemplate)
# In units of the crop side (face_helper.WARP_TEMPLATE_SET). arcface_128 is arcface_112_v2 seen in a
# 128-pixel crop with 8 pixels more on the left: inswapper's and hyperswap's crops.
WARP_TEMPLATES: Mapping[WarpTemplate, np.ndarray] = MappingProxyType(
    {
        "arcface_112_v2": np.array(
            [
                [0.34191607, 0.46157411],
                [0.65653393, 0.45983393],
                [0.50022500, 0.64050536],
                [0.37097589, 0.82469196],
                [0.63151696, 0.82325089],
            ],
            np.float32,
        ),
        "arcface_128": np.array(
            [
                [0.36167656, 0.40387734],
                [0.63696719, 0.40235469],
                [0.50019687, 0.56044219],
                [0.38710391, 0.72160547],
                [0.61507734, 0.72034453],
            ],
            np.float32,
        ),
    }
)


@dataclass(frozen=True)
class PixelScaling:
    """A model takes `(pixel - offset) / divisor` for pixels in 0..255; a swapper's output maps back as
    `value * divisor + offset` (FaceFusion's prepare_crop_frame and normalize_crop_frame)."""

    offset: float
    divisor: float


# inswapper: 0..1 in and out.
UNIT_RANGE = PixelScaling(offset=0.0, divisor=255.0)
# hyperswap's mean and deviation of 0.5, and ArcFace's x / 127.5 - 1: both -1..1.
SYMMETRIC_RANGE = PixelScaling(offset=127.5, divisor=127.5)

# How a swapper's "source" input is made from the ArcFace embedding (face_swapper/core.py,
# prepare_source_embedding):
# - "emap_embedding" (inswapper): the unit-length embedding projected by `emap`, the graph's last
#   initializer;
# - "normalised_embedding" (hyperswap): the unit-length embedding itself.
SourceKind = Literal["emap_embedding", "normalised_embedding"]
SOURCE_KINDS: tuple[SourceKind, ...] = typing.get_args(SourceKind)


@dataclass(frozen=True)
class EmbeddingSwapperSpec:
    """An imported swapper conditioned on the source's identity embedding rather than its crop."""

    name: SwapperName
    crop_size: int
    template: WarpTemplate
    scaling: PixelScaling
    source_kind: SourceKind


@dataclass(frozen=True)
class EmbedderSpec:
    name: str
    crop_size: int
    template: WarpTemplate
    scaling: PixelScaling
    embedding_size: int


# The recogniser every embedding swapper's source goes through (face_recognizer.py).
ARCFACE = EmbedderSpec("arcface_w600k_r50", 112, "arcface_112_v2", SYMMETRIC_RANGE, 512)

EMBEDDING_SWAPPERS: Mapping[str, EmbeddingSwapperSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            EmbeddingSwapperSpec("inswapper_128", 128, "arcface_128", UNIT_RANGE, "emap_embedding"),
            *(
                EmbeddingSwapperSpec(name, 256, "arcface_128", SYMMETRIC_RANGE, "normalised_embedding")
                for name in ("hyperswap_1a_256", "hyperswap_1b_256", "hyperswap_1c_256")
            ),
        )
    }
)
# Every model served in FP16 has its FP32 twin beside it, `<name>_fp32` (`make models`, `swapline models
# import`): what an answer holding NaN or Inf is asked again of, and what a GPU without fast FP16 serves.
FP32_TWIN_SUFFIX = "_fp32"


def fp32_twin_name(model: str) -> str:
    return f"{model}{FP32_TWIN_SUFFIX}"


# The Triton model that turns an ArcFace embedding into a swapper's `source` input, written by the
# importer beside the swapper: inswapper's emap lives in its graph, so the conversion is served too.
SOURCE_CONVERTER_SUFFIX = "_source"


def source_converter_name(swapper: str) -> str:
    return f"{swapper}{SOURCE_CONVERTER_SUFFIX}"


NameT = TypeVar("NameT", bound=str)


def _checked(kind: str, name: str, choices: tuple[NameT, ...]) -> NameT:
    """`name` as one of `choices` (the first, the built-in model, when empty); else InvalidArgument naming them."""
    chosen = name or choices[0]
    for known in choices:
        if chosen == known:
            return known
    raise InvalidArgument(f"{kind} {name[:64]!r} is not one of {', '.join(choices)}")


def checked_swapper(name: str) -> SwapperName:
    return _checked("swapper", name, SWAPPER_NAMES)


def checked_detector(name: str) -> DetectorName:
    return _checked("detector", name, DETECTOR_NAMES)


@dataclass(frozen=True)
class JobModels:
    """The models a job runs with, checked names."""

    swapper: SwapperName = "face_swapper"
    detector: DetectorName = "mtcnn"


BUILT_IN_MODELS = JobModels()


def job_models(swapper: str, detector: str) -> JobModels:
    return JobModels(checked_swapper(swapper), checked_detector(detector))


def imported_models_of(models: JobModels) -> tuple[str, ...]:
    """The imported Triton models a job runs with, twins included; the built-in ones are always loaded."""
    names: list[str] = []
    if models.swapper in EMBEDDING_SWAPPERS:
        swapper = models.swapper
        names += [swapper, fp32_twin_name(swapper), source_converter_name(swapper), ARCFACE.name]
    if models.detector != BUILT_IN_DETECTOR:
        names += [models.detector, fp32_twin_name(models.detector)]
    return tuple(names)

"""The encode settings a job may ask for, defined once: the gateway checks them at submit, the encoder again
when a segment's header arrives, both before anything is allocated.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal, get_args

from services.common.errors import InvalidArgument
from services.common.input_limits import DEFAULT_MAX_VIDEO_PIXELS, excerpt

X264Preset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"
]
X264_PRESETS: tuple[X264Preset, ...] = get_args(X264Preset)
# x264's constant rate factor: 0 is lossless, 51 the smallest output.
CRF_RANGE = range(0, 52)
# Frame rates such as 29.97 arrive as doubles; NTSC rates have denominator 1001.
MAX_RATE_DENOMINATOR = 1001
# High-speed camera footage reaches 1000 fps; beyond that a rate is a mistake, not a video.
MAX_FPS = 1000.0
# The largest picture H.264's top level allows (139,264 macroblocks of 16x16): every 8K format fits.
MAX_FRAME_PIXELS = DEFAULT_MAX_VIDEO_PIXELS


def checked_crf(crf: int) -> int:
    if crf not in CRF_RANGE:
        raise InvalidArgument(f"crf {crf} is outside {CRF_RANGE.start}..{CRF_RANGE.stop - 1}")
    return crf


def checked_preset(preset: str) -> X264Preset:
    for known in X264_PRESETS:
        if known == preset:
            return known
    raise InvalidArgument(f"preset {excerpt(preset)} is not one of {', '.join(X264_PRESETS)}")


def checked_frame_rate(fps: float) -> Fraction:
    """The rate as an exact fraction; INVALID_ARGUMENT unless 0 < fps <= MAX_FPS."""
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise InvalidArgument(f"fps must be above 0 and at most {MAX_FPS:g}, got {fps}")
    return Fraction(fps).limit_denominator(MAX_RATE_DENOMINATOR)


def check_frame_size(width: int, height: int, *, video: bool, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    """INVALID_ARGUMENT unless the size is positive, at most max_pixels and, for video, even.

    H.264 in yuv420p halves both sides for chroma, and neither x264 nor MP4 can carry the crop that
    padding by one pixel would need, so odd video sizes are refused; a still image may be odd.
    """
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"frame size must be positive, got {width}x{height}")
    if width * height > max_pixels:
        raise InvalidArgument(f"frame size {width}x{height} is over the limit of {max_pixels} pixels")
    if video and (width % 2 or height % 2):
        raise InvalidArgument(f"H.264 yuv420p needs an even width and height, got {width}x{height}")

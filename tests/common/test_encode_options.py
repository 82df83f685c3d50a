from __future__ import annotations

from fractions import Fraction

import pytest

from services.common.encode_options import (
    MAX_FRAME_PIXELS,
    X264_PRESETS,
    check_frame_size,
    checked_crf,
    checked_frame_rate,
    checked_preset,
)
from services.common.errors import InvalidArgument


@pytest.mark.parametrize("crf", [0, 20, 51])
def test_crf_inside_the_range_is_kept(crf: int) -> None:
    assert checked_crf(crf) == crf


@pytest.mark.parametrize("crf", [-1, 52, 1000])
def test_crf_outside_the_range_is_refused(crf: int) -> None:
    with pytest.raises(InvalidArgument, match=f"crf {crf} is outside 0..51"):
        checked_crf(crf)


def test_every_x264_preset_is_known_and_others_are_refused() -> None:
    assert [checked_preset(preset) for preset in X264_PRESETS] == list(X264_PRESETS)
    assert "veryfast" in X264_PRESETS and "placebo" in X264_PRESETS
    for wrong in ("bogus", "", "VeryFast", " fast"):
        with pytest.raises(InvalidArgument, match="is not one of ultrafast, superfast"):
            checked_preset(wrong)


def test_a_long_preset_is_shown_by_its_start_only() -> None:
    with pytest.raises(InvalidArgument) as caught:
        checked_preset("p" * 10_000)
    assert "p" * 41 not in caught.value.message
    assert "(10000 characters)" in caught.value.message


@pytest.mark.parametrize(
    ("fps", "rate"), [(25.0, Fraction(25)), (30000 / 1001, Fraction(30000, 1001)), (1000.0, Fraction(1000))]
)
def test_frame_rates_become_exact_fractions(fps: float, rate: Fraction) -> None:
    assert checked_frame_rate(fps) == rate


@pytest.mark.parametrize("fps", [0.0, -25.0, float("nan"), float("inf"), float("-inf"), 1000.5])
def test_impossible_frame_rates_are_refused(fps: float) -> None:
    with pytest.raises(InvalidArgument, match="fps must be above 0 and at most 1000"):
        checked_frame_rate(fps)


def test_video_sizes_must_be_even_but_images_may_be_odd() -> None:
    check_frame_size(320, 240, video=True)
    check_frame_size(321, 241, video=False)
    for width, height in ((321, 240), (320, 241)):
        with pytest.raises(InvalidArgument, match=f"even width and height, got {width}x{height}"):
            check_frame_size(width, height, video=True)


@pytest.mark.parametrize(("width", "height"), [(0, 240), (320, 0), (-2, 240)])
def test_empty_sizes_are_refused(width: int, height: int) -> None:
    with pytest.raises(InvalidArgument, match="frame size must be positive"):
        check_frame_size(width, height, video=False)


def test_sizes_over_the_pixel_limit_are_refused() -> None:
    check_frame_size(8192, 4320, video=True)
    with pytest.raises(InvalidArgument, match=f"100000x100000 is over the limit of {MAX_FRAME_PIXELS} pixels"):
        check_frame_size(100_000, 100_000, video=True)
    with pytest.raises(InvalidArgument, match="640x480 is over the limit of 100000 pixels"):
        check_frame_size(640, 480, video=False, max_pixels=100_000)

"""pixel_formats: the two frame layouts, told apart by shape, their proto values and host conversions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.frames.pixel_formats import (
    PIXEL_FORMATS,
    describe_frames,
    fits_nv12,
    frame_bytes,
    frame_shape,
    nv12_to_rgb,
    pixel_format_from_proto,
    pixel_format_to_proto,
    rgb_to_nv12,
)
from swapline.common.v1 import common_pb2


def test_frame_shapes_and_sizes() -> None:
    assert frame_shape("rgb24", 6, 4) == (4, 6, 3)
    assert frame_shape("nv12", 6, 4) == (6, 6)
    assert frame_bytes("rgb24", 6, 4) == 72
    assert frame_bytes("nv12", 6, 4) == 36


@pytest.mark.parametrize(("width", "height"), [(5, 4), (6, 3), (7, 7)])
def test_odd_sides_have_no_nv12_layout(width: int, height: int) -> None:
    assert not fits_nv12(width, height)
    assert frame_shape("rgb24", width, height) == (height, width, 3)
    with pytest.raises(InvalidArgument, match=f"a {width}x{height} picture has no NV12 layout"):
        frame_shape("nv12", width, height)


def test_even_sides_fit_nv12() -> None:
    assert fits_nv12(6, 4) and fits_nv12(1920, 1080)


def test_a_batch_says_its_layout_and_picture_size_by_its_shape() -> None:
    assert describe_frames(np.zeros((2, 4, 6, 3), np.uint8)) == ("rgb24", 6, 4)
    assert describe_frames(np.zeros((2, 6, 6), np.uint8)) == ("nv12", 6, 4)
    assert describe_frames(np.zeros((0, 1620, 1920), np.uint8)) == ("nv12", 1920, 1080)


@pytest.mark.parametrize(
    "shape",
    [(1, 4, 6, 4), (1, 4, 6), (1, 6, 5), (4, 6), (1, 1, 4, 6, 3)],
    ids=["rgba", "rows not a multiple of 3", "odd width", "one frame without the count", "five dimensions"],
)
def test_other_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidArgument, match=r"frames must be \(count, height, width, 3\) RGB or .* NV12, got"):
        describe_frames(np.zeros(shape, np.uint8))


def test_other_dtypes_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="frames must be uint8, got float32"):
        describe_frames(np.zeros((1, 4, 6, 3), np.float32))


def test_formats_round_trip_through_their_proto_values() -> None:
    assert pixel_format_to_proto("rgb24") == common_pb2.PIXEL_FORMAT_RGB24 == 0
    assert pixel_format_to_proto("nv12") == common_pb2.PIXEL_FORMAT_NV12 == 1
    assert [pixel_format_from_proto(int(pixel_format_to_proto(name))) for name in PIXEL_FORMATS] == list(PIXEL_FORMATS)


def test_an_unknown_proto_value_is_the_senders_mistake() -> None:
    with pytest.raises(InvalidArgument, match="unknown pixel format 7: this service takes rgb24, nv12"):
        pixel_format_from_proto(7)


def _picture(height: int = 8, width: int = 12) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_rgb_to_nv12_is_opencvs_i420_with_u_and_v_interleaved() -> None:
    picture = _picture()
    nv12 = rgb_to_nv12(picture)
    i420 = cv2.cvtColor(picture, cv2.COLOR_RGB2YUV_I420)
    assert nv12.shape == (12, 12) and nv12.dtype == np.uint8
    assert np.array_equal(nv12[:8], i420[:8])
    u, v = i420[8:].reshape(2, 4, 6)
    assert np.array_equal(nv12[8:, 0::2], u) and np.array_equal(nv12[8:, 1::2], v)


def test_nv12_to_rgb_is_opencvs_conversion_frame_by_frame() -> None:
    frames = np.stack([rgb_to_nv12(_picture()), rgb_to_nv12(_picture()[::-1].copy())])
    rgb = nv12_to_rgb(frames)
    assert rgb.shape == (2, 8, 12, 3)
    for frame, converted in zip(frames, rgb, strict=True):
        assert np.array_equal(converted, cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_NV12))


def test_a_flat_colour_survives_the_round_trip() -> None:
    """4:2:0 loses detail, not flat colour: a uniform picture comes back within rounding."""
    picture = np.empty((8, 12, 3), np.uint8)
    picture[:] = (200, 40, 90)
    back = nv12_to_rgb(rgb_to_nv12(picture)[None])[0]
    assert np.abs(back.astype(np.int16) - picture).max() <= 2

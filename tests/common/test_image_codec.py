from __future__ import annotations

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.image_codec import decode_rgb_image


def test_decoded_pixels_are_rgb() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 200
    encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    np.testing.assert_array_equal(decode_rgb_image(encoded, "source image"), image)


def test_empty_bytes_name_the_image() -> None:
    with pytest.raises(InvalidArgument, match="the reference image is empty"):
        decode_rgb_image(b"", "reference image")


def test_undecodable_bytes_name_the_image() -> None:
    with pytest.raises(InvalidArgument, match=r"the source image .* is not a decodable image"):
        decode_rgb_image(b"\x89PNG broken", "source image")

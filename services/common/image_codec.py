"""Encoded image bytes (PNG, JPEG, ...) to RGB pixels, with errors that name what the image was for."""

from __future__ import annotations

import cv2
import numpy as np

from services.common.errors import InvalidArgument
from services.common.input_limits import DEFAULT_INPUT_LIMITS, check_pixels, header_size


def decode_rgb_image(data: bytes, what: str, max_pixels: int = DEFAULT_INPUT_LIMITS.max_image_pixels) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or INVALID_ARGUMENT naming `what` (e.g. "source image").

    The size is read from the header first: OpenCV allocates the whole picture before it reads a
    pixel, so a small file claiming a huge picture is refused before any decoding starts.
    """
    width, height = header_size(data, what)
    check_pixels(what, width, height, max_pixels)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise InvalidArgument(f"the {what} ({len(data)} bytes) is not a decodable image")
    # In place: a second picture-sized buffer would double the peak.
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB, dst=decoded)

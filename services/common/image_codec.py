"""Encoded image bytes (PNG, JPEG, ...) to RGB pixels, with errors that name what the image was for."""

from __future__ import annotations

import cv2
import numpy as np

from services.common.errors import InvalidArgument


def decode_rgb_image(data: bytes, what: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or INVALID_ARGUMENT naming `what` (e.g. "source image")."""
    if not data:
        raise InvalidArgument(f"the {what} is empty")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise InvalidArgument(f"the {what} ({len(data)} bytes) is not a decodable image")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)

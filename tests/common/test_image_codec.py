from __future__ import annotations

import resource
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.image_codec import decode_rgb_image


def _bits_to_bytes(bits: list[int]) -> bytes:
    return bytes(
        sum(bit << shift for shift, bit in enumerate(bits[start : start + 8])) for start in range(0, len(bits), 8)
    )


def _huffman_code(value: int, length: int) -> list[int]:
    """Deflate writes Huffman codes from their most significant bit."""
    return [(value >> (length - 1 - shift)) & 1 for shift in range(length)]


# Codes of deflate's fixed Huffman table.
LITERAL_ZERO = _huffman_code(0b00110000, 8)
COPY_258_FROM_DISTANCE_1 = _huffman_code(0b11000101, 8) + _huffman_code(0, 5)
END_OF_BLOCK = _huffman_code(0, 7)


def zero_deflate(size: int) -> bytes:
    """`size` (> 258) zero bytes as raw deflate: one literal, then copies of 258.

    Header, literal and first copy take 24 bits, and eight copies 13 bytes, so the middle is one
    13-byte pattern repeated: gigabytes of pixels cost milliseconds to write.
    """
    copies, rest = divmod(size - 1, 258)
    # BFINAL 1, BTYPE 01 (fixed Huffman), least significant bit first.
    head = [1, 1, 0, *LITERAL_ZERO, *COPY_258_FROM_DISTANCE_1]
    periods, leftover = divmod(copies - 1, 8)
    tail = COPY_258_FROM_DISTANCE_1 * leftover + LITERAL_ZERO * rest + END_OF_BLOCK
    return _bits_to_bytes(head) + _bits_to_bytes(COPY_258_FROM_DISTANCE_1 * 8) * periods + _bits_to_bytes(tail)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(width: int, height: int) -> bytes:
    """A complete, valid RGB PNG of zeros, written without ever holding its pixels."""
    raw_size = height * (1 + 3 * width)
    adler32 = ((raw_size % 65521) << 16) | 1
    stream = b"\x78\x01" + zero_deflate(raw_size) + struct.pack(">I", adler32)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")


def test_decoded_pixels_are_rgb() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 200
    encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    np.testing.assert_array_equal(decode_rgb_image(encoded, "source image"), image)


def test_the_crafted_png_is_what_it_claims() -> None:
    decoded = cv2.imdecode(np.frombuffer(black_png(700, 300), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (300, 700, 3) and not decoded.any()


def test_empty_bytes_name_the_image() -> None:
    with pytest.raises(InvalidArgument, match="the reference image is empty"):
        decode_rgb_image(b"", "reference image")


def test_unknown_formats_name_the_image() -> None:
    with pytest.raises(InvalidArgument, match=r"the source image \(11 bytes\) is not a PNG, JPEG, BMP, WebP or TIFF"):
        decode_rgb_image(b"\x89PNG broken", "source image")


def test_undecodable_pixels_name_the_image() -> None:
    encoded = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    with pytest.raises(InvalidArgument, match=r"the source image .* is not a decodable image"):
        decode_rgb_image(encoded[:40], "source image")


def test_pictures_past_max_pixels_are_refused() -> None:
    encoded = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    assert decode_rgb_image(encoded, "source image", max_pixels=64).shape == (8, 8, 3)
    with pytest.raises(InvalidArgument, match=r"the source image is 8x8 .* \(63 pixels\)"):
        decode_rgb_image(encoded, "source image", max_pixels=63)


def test_a_small_png_of_huge_dimensions_is_refused_without_decoding() -> None:
    """17 MB that OpenCV would inflate into 2.7 GB of pixels, and then convert into another 2.7 GB."""
    data = black_png(30000, 30000)
    peak_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        with pytest.raises(
            InvalidArgument, match=r"the source image is 30000x30000 \(900\.0 Mpx\); the limit is 40\.0"
        ):
            decode_rgb_image(data, "source image")
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert traced_peak < 1024 * 1024
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_before < 64 * 1024

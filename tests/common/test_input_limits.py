"""Input limits: image sizes read from headers only, text checks, media checks against Probe's answer."""

from __future__ import annotations

import re
import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.input_limits import (
    InputLimits,
    check_media,
    check_text,
    excerpt,
    header_size,
    image_size,
)
from services.common.media_info import Keyframe, MediaInfo
from services.common.settings_loader import SettingsError

LIMITS = InputLimits()
PICTURE = np.random.default_rng(7).integers(0, 255, (37, 53, 3), np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk, nothing else: what a decoder reads before allocating."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_frame_header(width: int, height: int) -> bytes:
    return jpeg_segment(0xC0, struct.pack(">BHHB", 8, height, width, 3) + bytes(9))


def bmp_header(info: bytes) -> bytes:
    return b"BM" + bytes(12) + struct.pack("<I", len(info) + 4) + info


def webp_vp8x(width: int, height: int) -> bytes:
    canvas = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 22) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + canvas


def tiff(order: str, big: bool, entries: list[tuple[int, int, int]]) -> bytes:
    """A TIFF whose first directory holds (tag, type, value) entries, each value stored in the entry."""
    mark = b"II" if order == "<" else b"MM"
    if big:
        header = mark + struct.pack(order + "HHHQ", 43, 8, 0, 16)
        body = struct.pack(order + "Q", len(entries))
        value_formats = {3: "H6x", 4: "I4x", 16: "Q"}
        body += b"".join(struct.pack(order + "HHQ" + value_formats[t], tag, t, 1, v) for tag, t, v in entries)
    else:
        header = mark + struct.pack(order + "HI", 42, 8)
        body = struct.pack(order + "H", len(entries))
        value_formats = {3: "H2x", 4: "I"}
        body += b"".join(struct.pack(order + "HHI" + value_formats[t], tag, t, 1, v) for tag, t, v in entries)
    return header + body + bytes(4)


def video(**changes: object) -> MediaInfo:
    base = MediaInfo(
        kind="video",
        duration_seconds=10.0,
        fps=25.0,
        frame_count=250,
        width=1920,
        height=1080,
        has_audio=True,
        keyframes=(Keyframe(0, 0),),
    )
    return MediaInfo(**{**base.__dict__, **changes})


@pytest.mark.parametrize(
    ("extension", "parameters"),
    [
        (".png", []),
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".bmp", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        (".tiff", []),
    ],
    ids=["png", "jpeg", "progressive jpeg", "bmp", "lossy webp", "lossless webp", "tiff"],
)
def test_the_header_size_is_the_decoded_size(extension: str, parameters: list[int]) -> None:
    encoded = cv2.imencode(extension, PICTURE, parameters)[1].tobytes()
    decoded = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    assert image_size(encoded, "source image", LIMITS) == (decoded.shape[1], decoded.shape[0]) == (53, 37)


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png_header(30000, 20000), (30000, 20000)),
        (
            b"\xff\xd8" + jpeg_segment(0xE1, b"Exif\x00\x00" + jpeg_frame_header(1, 1)) + jpeg_frame_header(640, 480),
            (640, 480),
        ),
        (
            b"\xff\xd8" + jpeg_segment(0xE0, b"JFIF\x00") + b"stray\xff\xff\x00\xff\xd0" + jpeg_frame_header(64, 32),
            (64, 32),
        ),
        (b"\xff\xd8" + jpeg_segment(0xC4, bytes(20)) + jpeg_segment(0xC2, struct.pack(">BHH", 8, 7, 9)), (9, 7)),
        (bmp_header(struct.pack("<HHHH", 300, 200, 1, 24)), (300, 200)),
        (bmp_header(struct.pack("<ii", 300, -200) + bytes(28)), (300, 200)),
        (webp_vp8x(16_000, 9_000), (16_000, 9_000)),
        (tiff("<", False, [(256, 3, 640), (257, 4, 480)]), (640, 480)),
        (tiff(">", False, [(256, 4, 640), (257, 3, 480)]), (640, 480)),
        (tiff(">", True, [(256, 16, 70_000), (257, 3, 2)]), (70_000, 2)),
        (tiff("<", False, [(256, 3, 10), (257, 3, 10), (322, 3, 4096), (323, 3, 4096)]), (4096, 4096)),
    ],
    ids=[
        "png",
        "jpeg after an exif holding a frame header",
        "jpeg with stray bytes",
        "progressive jpeg after tables",
        "os2 bmp",
        "top-down bmp",
        "webp canvas",
        "little-endian tiff",
        "big-endian tiff",
        "bigtiff",
        "tiff whose tiles are larger than the image",
    ],
)
def test_crafted_headers(data: bytes, size: tuple[int, int]) -> None:
    assert header_size(data, "image") == size


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a\x10\x00\x10\x00",
        cv2.imencode(".jp2", PICTURE)[1].tobytes(),
        cv2.imencode(".ppm", PICTURE)[1].tobytes(),
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"plain text",
    ],
    ids=["gif", "jpeg 2000", "ppm", "wav", "text"],
)
def test_other_formats_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"the source image \(\d+ bytes\) is not a PNG, JPEG, BMP, WebP or TIFF"):
        header_size(data, "source image")


@pytest.mark.parametrize(
    "data",
    [
        png_header(10, 10)[:20],
        b"\x89PNG\r\n\x1a\n" + bytes(16),
        b"\xff\xd8\xff\xe0\x00",
        b"\xff\xd8" + jpeg_segment(0xDA, bytes(4)) + jpeg_frame_header(8, 8),
        b"\xff\xd8\xff\xe0\x00\x01",
        b"BM" + bytes(16),
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(4),
        tiff("<", False, [(256, 3, 640)]),
        b"II*\x00\xff\xff\xff\x7f",
        b"II+\x00\x08\x00\x00\x00",
    ],
    ids=[
        "png cut in ihdr",
        "png without ihdr",
        "jpeg cut in a length",
        "jpeg scan before frame",
        "jpeg segment shorter than its length field",
        "bmp cut",
        "webp cut",
        "tiff without height",
        "tiff directory past the end",
        "bigtiff cut",
    ],
)
def test_truncated_or_corrupt_headers_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"the reference image \(\d+ bytes\) has a truncated or corrupt header"):
        header_size(data, "reference image")


def test_empty_image_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"^the source image is empty$"):
        image_size(b"", "source image", LIMITS)


def test_too_many_pixels_name_the_image_its_size_and_the_limit() -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"^the source image is 30000x30000 \(900\.0 Mpx\); the limit is 40\.0 Mpx \(40000000 pixels\)$",
    ):
        image_size(png_header(30000, 30000), "source image", LIMITS)


def test_pixels_on_the_limit_are_allowed() -> None:
    assert image_size(png_header(8000, 5000), "source image", LIMITS) == (8000, 5000)


def test_zero_sized_pictures_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"the source image has no picture size \(0x480\)"):
        image_size(png_header(0, 480), "source image", LIMITS)


def test_too_many_bytes_are_refused_before_the_header_is_read() -> None:
    with pytest.raises(InvalidArgument, match=r"^the reference image is 101 bytes; the limit is 100 bytes$"):
        image_size(b"not an image at all" + bytes(82), "reference image", InputLimits(max_image_bytes=100))


def test_a_jpeg_of_tiny_segments_is_refused_quickly() -> None:
    data = b"\xff\xd8" + jpeg_segment(0xE0, b"") * 2_000_000 + jpeg_frame_header(8, 8)
    started = time.perf_counter()
    with pytest.raises(InvalidArgument, match="truncated or corrupt header"):
        header_size(data, "source image")
    assert time.perf_counter() - started < 1.0


def test_text_within_the_limit_passes() -> None:
    check_text("target filename", "clip été 2026 (final).mp4", 255)


def test_text_too_long_names_its_length_and_is_not_echoed_whole() -> None:
    value = "a" * 1_000_000
    with pytest.raises(InvalidArgument) as raised:
        check_text("target_uri", value, 1024)
    assert raised.value.message.startswith("the target_uri is 1000000 characters long; the limit is 1024")
    assert len(raised.value.message) < 200


@pytest.mark.parametrize(
    ("value", "code_point", "position"),
    [("a\x00b", "U+0000", 1), ("\tx", "U+0009", 0), ("x\x7f", "U+007F", 1), ("ab\x85", "U+0085", 2)],
)
def test_control_characters_are_refused(value: str, code_point: str, position: int) -> None:
    with pytest.raises(
        InvalidArgument, match=re.escape(f"the job id holds the control character {code_point} at position {position}")
    ):
        check_text("job id", value, 64)


def test_excerpt_quotes_short_text_whole_and_cuts_long_text() -> None:
    assert excerpt("a\x00b") == "'a\\x00b'"
    assert excerpt("x" * 50) == f"'{'x' * 40}'... (50 characters)"


def test_media_within_the_limits_passes() -> None:
    check_media(video(width=8192, height=4352, frame_count=LIMITS.max_frames), "target", LIMITS)


def test_video_frames_past_the_pixel_limit_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"^the target is 12000x12000 \(144\.0 Mpx\); the limit is 35\.7 Mpx"):
        check_media(video(width=12000, height=12000), "target", LIMITS)


def test_images_have_the_image_pixel_limit() -> None:
    photo = video(kind="image", width=7000, height=5000, frame_count=1, duration_seconds=0.0)
    check_media(photo, "target", LIMITS)
    with pytest.raises(InvalidArgument, match=r"the target is 7000x5000"):
        check_media(photo, "target", InputLimits(max_image_pixels=34_999_999))


def test_too_many_frames_are_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"^the target has 648001 frames; the limit is 648000$"):
        check_media(video(frame_count=648_001), "target", LIMITS)


def test_too_long_a_duration_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"^the target lasts 10800\.5 s; the limit is 10800\.0 s$"):
        check_media(video(duration_seconds=10_800.5), "target", LIMITS)


@pytest.mark.parametrize("field", ["max_image_bytes", "max_image_pixels", "max_frames", "max_duration_seconds"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(SettingsError, match=field):
        InputLimits(**{field: 0})


def test_filename_limit_cannot_pass_what_the_file_system_allows() -> None:
    with pytest.raises(SettingsError, match="max_filename_length"):
        InputLimits(max_filename_length=256)


def test_the_jpeg_frame_header_found_is_the_one_opencv_decodes() -> None:
    """A frame header inside an EXIF segment (a thumbnail's) and stray bytes do not mislead the reader."""
    encoded = cv2.imencode(".jpg", PICTURE)[1].tobytes()
    decoy = jpeg_segment(0xE1, b"Exif\x00\x00\xff\xd8" + jpeg_frame_header(9000, 9000))
    crafted = encoded[:2] + decoy + b"stray\xff\xff\x00" + encoded[2:]
    decoded = cv2.imdecode(np.frombuffer(crafted, np.uint8), cv2.IMREAD_COLOR)
    assert header_size(crafted, "source image") == (decoded.shape[1], decoded.shape[0]) == (53, 37)

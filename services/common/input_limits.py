"""Limits on what a caller may send, checked before anything large is allocated or any path is touched.

Images are measured from their header alone (a few dozen bytes), media from what Probe read without
decoding, and strings before they reach the file system, so a small request can never make a service
allocate gigabytes or spin on a pathological path.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.media_info import MediaInfo
from services.common.settings_loader import ValidatedSettings, ranged

# A user string is shown in a message by its first characters only.
EXCERPT_CHARACTERS = 40
ACCEPTED_IMAGE_FORMATS = "PNG, JPEG, BMP, WebP or TIFF"

# Largest picture of the top levels of H.264 (139,264 macroblocks), H.265 and AV1 (35,651,584 luma
# samples): every 8K format (7680x4320, DCI 8192x4320) fits, and one decoded RGB frame stays near 107 MB.
DEFAULT_MAX_VIDEO_PIXELS = 35_651_584
# 40 Mpx covers most camera photos (7728x5152 is 39.8 Mpx); decoding one takes about 120 MB of RGB.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# A 40 Mpx JPEG at high quality is 10-20 MB; a face photo is far smaller. Images travel inside the spec
# message, so this also bounds what a single SubmitJob message holds in memory.
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Three hours covers feature-length videos; at 60 fps that is 648,000 frames. Probe keeps a timestamp
# per frame while it counts them (about 100 bytes each in Python: 65 MB at the limit).
DEFAULT_MAX_DURATION_SECONDS = 3 * 3600.0
DEFAULT_MAX_FRAMES = 3 * 3600 * 60
# Media URIs are short relative paths (uploads/<job>/<name>); 1024 leaves room for deep folders while
# keeping path resolution cheap. Linux's PATH_MAX is 4096.
DEFAULT_MAX_URI_LENGTH = 1024
# NAME_MAX of Linux file systems, in bytes of the UTF-8 name: a longer component fails every open().
DEFAULT_MAX_FILENAME_LENGTH = 255


@dataclass(frozen=True, kw_only=True)
class InputLimits(ValidatedSettings):
    max_image_bytes: int = ranged(DEFAULT_MAX_IMAGE_BYTES, ge=1)
    max_image_pixels: int = ranged(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # Per frame of a video.
    max_video_pixels: int = ranged(DEFAULT_MAX_VIDEO_PIXELS, ge=1)
    max_frames: int = ranged(DEFAULT_MAX_FRAMES, ge=1)
    max_duration_seconds: float = ranged(DEFAULT_MAX_DURATION_SECONDS, gt=0.0)
    max_uri_length: int = ranged(DEFAULT_MAX_URI_LENGTH, ge=1)
    max_filename_length: int = ranged(DEFAULT_MAX_FILENAME_LENGTH, ge=1, le=DEFAULT_MAX_FILENAME_LENGTH)


DEFAULT_INPUT_LIMITS = InputLimits()


def excerpt(value: str) -> str:
    """The start of a user string, quoted with its control characters escaped, for error messages."""
    if len(value) <= EXCERPT_CHARACTERS:
        return repr(value)
    return f"{value[:EXCERPT_CHARACTERS]!r}... ({len(value)} characters)"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


def check_text(what: str, value: str, max_length: int) -> None:
    """INVALID_ARGUMENT when `value` is longer than max_length characters or holds a control character."""
    if len(value) > max_length:
        raise InvalidArgument(
            f"the {what} is {len(value)} characters long; the limit is {max_length} (it starts {excerpt(value)})"
        )
    for position, character in enumerate(value):
        if unicodedata.category(character) == "Cc":
            raise InvalidArgument(
                f"the {what} holds the control character U+{ord(character):04X} at position {position}: "
                f"{excerpt(value)}"
            )


def check_pixels(what: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"the {what} has no picture size ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidArgument(
            f"the {what} is {width}x{height} ({_megapixels(width * height)}); "
            f"the limit is {_megapixels(max_pixels)} ({max_pixels} pixels)"
        )


def check_media(info: MediaInfo, what: str, limits: InputLimits) -> None:
    """INVALID_ARGUMENT when Probe's answer shows more pixels per frame, frames or seconds than allowed."""
    if info.kind == "image":
        check_pixels(what, info.width, info.height, limits.max_image_pixels)
        return
    check_pixels(what, info.width, info.height, limits.max_video_pixels)
    if info.frame_count > limits.max_frames:
        raise InvalidArgument(f"the {what} has {info.frame_count} frames; the limit is {limits.max_frames}")
    if info.duration_seconds > limits.max_duration_seconds:
        raise InvalidArgument(
            f"the {what} lasts {info.duration_seconds:.1f} s; the limit is {limits.max_duration_seconds:.1f} s"
        )


def image_size(data: bytes, what: str, limits: InputLimits) -> tuple[int, int]:
    """(width, height) read from the image's header; INVALID_ARGUMENT when bytes or pixels pass the limits."""
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"the {what} is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes")
    width, height = header_size(data, what)
    check_pixels(what, width, height, limits.max_image_pixels)
    return width, height


def header_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) that OpenCV's decoder for these bytes will allocate, read from the header alone."""
    if not data:
        raise InvalidArgument(f"the {what} is empty")
    reader = _reader_for(data)
    if reader is None:
        raise InvalidArgument(f"the {what} ({len(data)} bytes) is not a {ACCEPTED_IMAGE_FORMATS} image")
    size = reader(data)
    if size is None:
        raise InvalidArgument(f"the {what} ({len(data)} bytes) has a truncated or corrupt header")
    return size


def _png_size(data: bytes) -> tuple[int, int] | None:
    # The IHDR chunk comes first: signature (8), length (4), type (4), width and height (4 + 4).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return width, height


# Start-of-frame markers: baseline, extended, progressive, lossless, and their hierarchical and
# arithmetic-coded variants. C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# A second SOI, an EOI or a scan before any frame header: libjpeg refuses the image.
_JPEG_FRAMELESS_END_MARKERS = frozenset({0xD8, 0xD9, 0xDA})
# One or more 0xFF, then the marker byte.
_JPEG_MARKER = re.compile(rb"\xff+([^\xff])")
# Camera files carry a few dozen segments (EXIF, ICC profile pieces, XMP, tables) before the frame
# header; a file of tiny segments would otherwise cost a Python loop per four bytes.
_JPEG_MAX_SEGMENTS_BEFORE_FRAME = 1024


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The first frame header, found the way libjpeg's marker reader finds it.

    Bytes between segments that are not a marker are skipped, as are fill bytes (FF FF) and stuffed
    zeros (FF 00); every other marker's segment is skipped by its length. libjpeg refuses a second
    frame header, so the first is the one it allocates for.
    """
    position = 2
    for _ in range(_JPEG_MAX_SEGMENTS_BEFORE_FRAME):
        found = _JPEG_MARKER.search(data, position)
        if found is None:
            return None
        marker, position = found.group(1)[0], found.end()
        if marker == 0x00 or marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker in _JPEG_FRAMELESS_END_MARKERS or position + 2 > len(data):
            return None
        (length,) = struct.unpack_from(">H", data, position)
        if marker in _JPEG_FRAME_MARKERS:
            # Length (2), sample precision (1), then the number of lines and of samples per line.
            if length < 7 or position + 7 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, position + 3)
            return width, height
        if length < 2:
            return None
        position += length
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 18:
        return None
    (header_bytes,) = struct.unpack_from("<I", data, 14)
    if header_bytes == 12:
        if len(data) < 22:
            return None
        width, height = struct.unpack_from("<HH", data, 18)
        return width, height
    if header_bytes < 16 or len(data) < 26:
        return None
    # A negative height is a top-down bitmap of that many rows.
    signed_width, signed_height = struct.unpack_from("<ii", data, 18)
    return abs(signed_width), abs(signed_height)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        # The canvas: 24-bit width and height, each minus one; every frame lies inside it.
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 256, 257, 322, 323
_TIFF_SIZE_TAGS = frozenset({_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH})
# Real directories hold a few dozen entries, sorted by tag; the size tags come early.
_TIFF_MAX_ENTRIES = 4096


@dataclass(frozen=True)
class _TiffLayout:
    """Where classic TIFF and BigTIFF put the first directory and its entries' integer values."""

    offset_format: str
    count_format: str
    entry_bytes: int
    # Field type -> struct format of an integer that fits in the entry itself.
    integer_formats: dict[int, str]


_CLASSIC_TIFF = _TiffLayout("I", "H", 12, {3: "H", 4: "I"})
_BIG_TIFF = _TiffLayout("Q", "Q", 20, {3: "H", 4: "I", 16: "Q"})


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """The first directory's image size, the only directory an image decode reads.

    OpenCV decodes a tiled TIFF a tile at a time into a buffer of one whole tile, whatever the image
    size, so each side counts as the larger of the image's and the tile's.
    """
    order = "<" if data[:2] == b"II" else ">"
    layout = _BIG_TIFF if data[2:4] in (b"+\x00", b"\x00+") else _CLASSIC_TIFF
    offset_bytes = struct.calcsize(layout.offset_format)
    # Classic: byte order, 42, offset. BigTIFF: byte order, 43, offset size, 0, offset.
    offset_at = 4 if layout is _CLASSIC_TIFF else 8
    if len(data) < offset_at + offset_bytes:
        return None
    (directory,) = struct.unpack_from(order + layout.offset_format, data, offset_at)
    count_bytes = struct.calcsize(layout.count_format)
    if directory + count_bytes > len(data):
        return None
    (entries,) = struct.unpack_from(order + layout.count_format, data, directory)
    first_entry = directory + count_bytes
    present = min(entries, (len(data) - first_entry) // layout.entry_bytes, _TIFF_MAX_ENTRIES)
    found: dict[int, int] = {}
    for index in range(present):
        entry = first_entry + index * layout.entry_bytes
        tag, field_type = struct.unpack_from(order + "HH", data, entry)
        value_format = layout.integer_formats.get(field_type)
        if tag in _TIFF_SIZE_TAGS and tag not in found and value_format is not None:
            # Tag (2), type (2), value count (4 or 8), then the value itself, left-justified.
            found[tag] = struct.unpack_from(order + value_format, data, entry + 4 + offset_bytes)[0]
    if _TIFF_WIDTH not in found or _TIFF_LENGTH not in found:
        return None
    return (
        max(found[_TIFF_WIDTH], found.get(_TIFF_TILE_WIDTH, 0)),
        max(found[_TIFF_LENGTH], found.get(_TIFF_TILE_LENGTH, 0)),
    )


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", _png_size),
    (b"\xff\xd8\xff", _jpeg_size),
    (b"BM", _bmp_size),
    (b"II*\x00", _tiff_size),
    (b"MM\x00*", _tiff_size),
    (b"II+\x00", _tiff_size),
    (b"MM\x00+", _tiff_size),
)


def _reader_for(data: bytes) -> Callable[[bytes], tuple[int, int] | None] | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size
    for signature, reader in _SIGNATURES:
        if data.startswith(signature):
            return reader
    return None


def limits_from(settings: object) -> InputLimits:
    """The limits a settings object names (fields of the same names); the defaults for the rest."""
    return InputLimits(
        **{
            field.name: getattr(settings, field.name)
            for field in dataclasses.fields(InputLimits)
            if hasattr(settings, field.name)
        }
    )

"""FrameBatch messages written and read at the protobuf wire level, for the streams that carry frames.

Going through the generated classes copies each frame's pixels three times on the way out (numpy to
bytes, bytes into the message, the message into its serialised form) and twice on the way in (the
message out of the received bytes, the field out of the message); at 2.7 MB per 720p frame those copies
were a third of the CPU a hop costs. These functions write the same bytes as the generated serialiser
(field numbers read from common.proto's descriptors; the tests compare both byte for byte) with one copy
out, and read them back as views into the received bytes with none. Every other message stays generated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.common.frames.pixel_formats import (
    PixelFormat,
    describe_frames,
    pixel_format_from_proto,
    pixel_format_to_proto,
)
from swapline.common.v1 import common_pb2

_BATCH_FIELDS = common_pb2.FrameBatch.DESCRIPTOR.fields_by_name
_BATCH_WIDTH, _BATCH_HEIGHT, _BATCH_FRAMES, _BATCH_FORMAT, _BATCH_SHARED = (
    _BATCH_FIELDS[name].number for name in ("width", "height", "frames", "pixel_format", "shared")
)
_SHARED_NAME = common_pb2.SharedFrames.DESCRIPTOR.fields_by_name["name"].number
_FRAME_FIELDS = common_pb2.Frame.DESCRIPTOR.fields_by_name
_FRAME_INDEX, _FRAME_PTS, _FRAME_PIXELS = (_FRAME_FIELDS[name].number for name in ("index", "pts", "pixels"))
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_UINT64 = 1 << 64

Buffer = bytes | memoryview


@dataclass(frozen=True)
class FrameRun:
    """Frames to send as one FrameBatch: (n, H, W, 3) uint8 RGB or (n, H * 3 / 2, W) NV12 (pixel_formats), with their
    indices and timestamps."""

    frames: np.ndarray
    indices: Sequence[int]
    pts: Sequence[int] | None = None


@dataclass(frozen=True)
class SharedFrameRun:
    """Frames written to a frame memory file (frame_memory.py), to send as a FrameBatch that names the file."""

    name: str
    pixel_format: PixelFormat
    width: int
    height: int
    indices: Sequence[int]
    pts: Sequence[int] | None = None


OutgoingFrames = FrameRun | SharedFrameRun


@dataclass(frozen=True)
class FrameView:
    index: int
    pts: int
    pixels: memoryview


@dataclass(frozen=True)
class FrameBatchView:
    """A received FrameBatch whose frames' pixels are read-only views into the received bytes."""

    width: int
    height: int
    frames: list[FrameView]
    pixel_format: PixelFormat = "rgb24"
    # The frame memory file that holds the frames' pixels (SharedFrames), "" when they are in the message.
    shared: str = ""


def _varint(value: int) -> bytes:
    value %= _UINT64  # negative int64 values go out as their 64-bit two's complement, as protobuf writes them
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint_field(field: int, value: int) -> bytes:
    """Empty for 0: proto3 does not write default values."""
    return _key(field, _VARINT) + _varint(value) if value else b""


def _length_prefix(field: int, length: int) -> bytes:
    return _key(field, _LENGTH_DELIMITED) + _varint(length)


def _shared_batch(run: SharedFrameRun) -> bytes:
    """Generated: the message is small, its pixels are in the file."""
    stamps = run.pts if run.pts is not None else [0] * len(run.indices)
    return common_pb2.FrameBatch(
        width=run.width,
        height=run.height,
        frames=[
            common_pb2.Frame(index=int(index), pts=int(stamp)) for index, stamp in zip(run.indices, stamps, strict=True)
        ],
        pixel_format=pixel_format_to_proto(run.pixel_format),
        shared=common_pb2.SharedFrames(name=run.name),
    ).SerializeToString()


def frame_batch_parts(run: OutgoingFrames) -> tuple[list[Buffer], int]:
    """The serialised FrameBatch as pieces to join (the pixels uncopied) and its total length."""
    if isinstance(run, SharedFrameRun):
        message = _shared_batch(run)
        return [message], len(message)
    frames = run.frames
    pixel_format, width, height = describe_frames(frames)
    if len(run.indices) != len(frames):
        raise InvalidArgument(f"{len(frames)} frames but {len(run.indices)} indices")
    stamps = run.pts if run.pts is not None else [0] * len(frames)
    parts: list[Buffer] = [_varint_field(_BATCH_WIDTH, width) + _varint_field(_BATCH_HEIGHT, height)]
    for frame, index, stamp in zip(frames, run.indices, stamps, strict=True):
        pixels = np.ascontiguousarray(frame).reshape(-1).data
        head = _varint_field(_FRAME_INDEX, int(index)) + _varint_field(_FRAME_PTS, int(stamp))
        head += _length_prefix(_FRAME_PIXELS, len(pixels)) if len(pixels) else b""
        parts += [_length_prefix(_BATCH_FRAMES, len(head) + len(pixels)) + head, pixels]
    # After the frames, in field order, as the generated serialiser writes it.
    parts.append(_varint_field(_BATCH_FORMAT, pixel_format_to_proto(pixel_format)))
    return parts, sum(len(part) for part in parts)


def serialize_frame_batch(run: OutgoingFrames) -> bytes:
    parts, _ = frame_batch_parts(run)
    return b"".join(parts)


def serialize_frame_batch_field(field: int, run: OutgoingFrames) -> bytes:
    """A message whose only field, number `field`, is the FrameBatch (EncodeSegmentRequest.frames)."""
    parts, length = frame_batch_parts(run)
    return b"".join([_length_prefix(field, length), *parts])


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data):
            raise InvalidArgument("truncated frame message: a varint runs past the end")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift >= 70:
            raise InvalidArgument("malformed frame message: a varint is longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - _UINT64 if value >= 1 << 63 else value


def _field_spans(data: Buffer) -> Iterator[tuple[int, int | memoryview, int, int]]:
    """(field number, value, start, end) for each field: an int for varints, a view for everything else;
    data[start:end] is the whole field, key included."""
    view = memoryview(data).cast("B")
    position = 0
    while position < len(view):
        start = position
        key, position = _read_varint(view, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, position = _read_varint(view, position)
            yield field, value, start, position
            continue
        if wire_type == _LENGTH_DELIMITED:
            size, position = _read_varint(view, position)
        elif wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
        else:
            raise InvalidArgument(f"malformed frame message: field {field} has wire type {wire_type}")
        if position + size > len(view):
            raise InvalidArgument(f"truncated frame message: field {field} runs past the end")
        yield field, view[position : position + size], start, position + size
        position += size


def iter_fields(data: Buffer) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) for each field: an int for varints, a view for everything else."""
    for field, value, _, _ in _field_spans(data):
        yield field, value


def _parse_frame(data: memoryview) -> FrameView:
    index = pts = 0
    pixels = memoryview(b"")
    for field, value in iter_fields(data):
        if field == _FRAME_INDEX and isinstance(value, int):
            index = _signed64(value)
        elif field == _FRAME_PTS and isinstance(value, int):
            pts = _signed64(value)
        elif field == _FRAME_PIXELS and isinstance(value, memoryview):
            pixels = value
    return FrameView(index=index, pts=pts, pixels=pixels)


def _shared_name(data: memoryview) -> str:
    for field, value in iter_fields(data):
        if field == _SHARED_NAME and isinstance(value, memoryview):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument("malformed frame message: the shared frames' name is not UTF-8") from None
    return ""


def parse_frame_batch(data: Buffer) -> FrameBatchView:
    width = height = pixel_format = 0
    shared = ""
    frames: list[FrameView] = []
    for field, value in iter_fields(data):
        if field == _BATCH_WIDTH and isinstance(value, int):
            width = _signed64(value)
        elif field == _BATCH_HEIGHT and isinstance(value, int):
            height = _signed64(value)
        elif field == _BATCH_FORMAT and isinstance(value, int):
            pixel_format = value
        elif field == _BATCH_FRAMES and isinstance(value, memoryview):
            frames.append(_parse_frame(value))
        elif field == _BATCH_SHARED and isinstance(value, memoryview):
            shared = _shared_name(value)
    return FrameBatchView(width, height, frames, pixel_format_from_proto(pixel_format), shared)


def split_frame_batch_field(field: int, data: Buffer) -> tuple[FrameBatchView | None, bytes]:
    """The FrameBatch in field `field` (None if absent), and the message's other fields for a generated parser.

    Senders write the field once; a message that repeats it (which protobuf would merge) is refused.
    """
    found: memoryview | None = None
    view = memoryview(data).cast("B")
    rest: list[memoryview] = []
    for number, value, start, end in _field_spans(view):
        if number != field or not isinstance(value, memoryview):
            rest.append(view[start:end])
        elif found is not None:
            raise InvalidArgument(f"frame message repeats field {field}")
        else:
            found = value
    return None if found is None else parse_frame_batch(found), b"".join(rest)

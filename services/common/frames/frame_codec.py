"""Packs numpy frames (RGB24 or NV12, pixel_formats) into FrameBatch messages and back, checking sizes on the way in.

The frame streams (decode, encode) send FrameRuns through frame_wire's serialiser and receive
FrameBatchViews; unpack_frames reads both those and generated FrameBatch messages. Where both ends share a frame
memory (frame_memory.py), outgoing_runs writes a batch there and sends a SharedFrameRun naming it, and
received_frames maps it back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from prometheus_client import Counter

from services.common.errors import InvalidArgument
from services.common.frames.frame_memory import FrameMemory
from services.common.frames.frame_wire import FrameBatchView, FrameRun, OutgoingFrames, SharedFrameRun
from services.common.frames.pixel_formats import (
    describe_frames,
    frame_bytes,
    frame_shape,
    nv12_to_rgb,
    pixel_format_from_proto,
    pixel_format_to_proto,
)
from swapline.common.v1 import common_pb2

Frames = NDArray[np.uint8]  # (count, height, width, 3) RGB24 or (count, height * 3 / 2, width) NV12

# Streams carry frames in messages of about this size (one 720p frame), so the receiver works on one
# frame while the next is on the wire, and regroups them into the batches the models want.
STREAM_MESSAGE_BYTES = 4 * 1024 * 1024

# How a batch of frames went to the next service: written to the shared frame memory, or in the messages.
FrameWay = Literal["frame_memory", "message"]
FRAME_BATCHES_SENT = Counter(
    "swapline_frame_batches_sent_total", "Frame batches streamed to another service, by the way they went.", ["way"]
)


def pack_frames(frames: Frames, indices: Sequence[int], pts: Sequence[int] | None = None) -> common_pb2.FrameBatch:
    pixel_format, width, height = describe_frames(frames)
    if len(indices) != frames.shape[0]:
        raise InvalidArgument(f"{frames.shape[0]} frames but {len(indices)} indices")
    stamps = pts if pts is not None else [0] * len(indices)
    batch = common_pb2.FrameBatch(width=width, height=height, pixel_format=pixel_format_to_proto(pixel_format))
    for frame, index, stamp in zip(frames, indices, stamps, strict=True):
        batch.frames.add(index=int(index), pts=int(stamp), pixels=np.ascontiguousarray(frame).tobytes())
    return batch


def frame_runs(
    frames: Frames,
    indices: Sequence[int],
    pts: Sequence[int] | None = None,
    message_bytes: int = STREAM_MESSAGE_BYTES,
) -> Iterator[FrameRun]:
    """The frames as consecutive runs of at most message_bytes each (at least one frame a run), one per message."""
    frame_bytes = max(1, int(np.prod(frames.shape[1:])))
    step = max(1, message_bytes // frame_bytes)
    for start in range(0, len(frames), step):
        stop = start + step
        yield FrameRun(frames[start:stop], indices[start:stop], None if pts is None else pts[start:stop])


def outgoing_runs(
    memory: FrameMemory | None,
    frames: Frames,
    indices: Sequence[int],
    pts: Sequence[int] | None = None,
    tag: str = "",
) -> tuple[list[OutgoingFrames], str | None]:
    """The messages that carry the frames, and the frame memory file written for them (None: none was).

    With a memory that has room, one SharedFrameRun for the whole batch; otherwise frame_runs' messages.
    """
    name = memory.put(frames, tag) if memory is not None and len(frames) else None
    way: FrameWay = "message" if name is None else "frame_memory"
    FRAME_BATCHES_SENT.labels(way=way).inc()
    if name is None:
        return list(frame_runs(frames, indices, pts)), None
    pixel_format, width, height = describe_frames(frames)
    return [SharedFrameRun(name, pixel_format, width, height, list(indices), None if pts is None else list(pts))], name


async def regroup_frames(
    parts: AsyncIterator[tuple[Frames, list[int]]], batch_size: int
) -> AsyncIterator[tuple[Frames, list[int]]]:
    """Joins streamed pieces into writable batches of batch_size frames (the last may be short).

    Each frame is copied exactly once, into its batch, so the pieces may be read-only views; a writable piece that
    is a whole batch by itself (frames from a frame memory) is passed on as it is.
    """
    if batch_size < 1:
        # Below 1 every loop would yield an empty batch forever (a worker once started with BATCH_SIZE=0).
        raise InvalidArgument(f"batches must hold at least one frame, got batch_size {batch_size}")
    pending: list[Frames] = []
    pending_indices: list[int] = []
    async for frames, indices in parts:
        if not pending and len(indices) == batch_size and frames.flags.writeable:
            yield frames, list(indices)
            continue
        pending.append(frames)
        pending_indices.extend(indices)
        while len(pending_indices) >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size], pending_indices[:batch_size]
            pending = [joined[batch_size:]] if len(joined) > batch_size else []
            pending_indices = pending_indices[batch_size:]
    if pending_indices:
        yield np.concatenate(pending), pending_indices


def unpack_frames(
    batch: common_pb2.FrameBatch | FrameBatchView, copy: bool = True
) -> tuple[Frames, list[int], list[int]]:
    """Returns (frames, indices, pts); a frame whose byte count is off is an INVALID_ARGUMENT.

    With copy=False a one-frame batch comes back as a read-only view of the received bytes, for
    receivers that only read (the encoder) or copy anyway (regroup_frames).
    """
    width, height = batch.width, batch.height
    pixel_format = (
        batch.pixel_format if isinstance(batch, FrameBatchView) else pixel_format_from_proto(batch.pixel_format)
    )
    if width < 0 or height < 0 or (batch.frames and (width == 0 or height == 0)):
        raise InvalidArgument(f"frame batch has invalid size {width}x{height}")
    shape = frame_shape(pixel_format, width, height)
    if not batch.frames:
        return np.zeros((0, *shape), np.uint8), [], []
    expected = frame_bytes(pixel_format, width, height)
    for frame in batch.frames:
        if len(frame.pixels) != expected:
            raise InvalidArgument(
                f"frame {frame.index} has {len(frame.pixels)} bytes, expected {expected} for {width}x{height} "
                f"{pixel_format}"
            )
    indices, stamps = [f.index for f in batch.frames], [f.pts for f in batch.frames]
    if not copy and len(batch.frames) == 1:
        return np.frombuffer(batch.frames[0].pixels, np.uint8).reshape(1, *shape), indices, stamps
    buffer = np.empty((len(batch.frames), *shape), np.uint8)
    for slot, pixels in enumerate(frame.pixels for frame in batch.frames):
        buffer[slot] = np.frombuffer(pixels, np.uint8).reshape(shape)
    return buffer, indices, stamps


def received_frames(batch: FrameBatchView, memory: FrameMemory | None) -> tuple[Frames, list[int], list[int]]:
    """unpack_frames(copy=False) for frames in the message; for SharedFrames, the frame memory file mapped."""
    if not batch.shared:
        return unpack_frames(batch, copy=False)
    if memory is None:
        raise InvalidArgument("frames came in a shared frame memory, but this service has none")
    if batch.width <= 0 or batch.height <= 0:
        raise InvalidArgument(f"shared frames: a batch of {batch.width}x{batch.height} pictures")
    if any(len(frame.pixels) for frame in batch.frames):
        raise InvalidArgument("shared frames: the batch's frames carry pixels too")
    shape = frame_shape(batch.pixel_format, batch.width, batch.height)
    frames = memory.take(batch.shared, len(batch.frames), shape)
    return frames, [frame.index for frame in batch.frames], [frame.pts for frame in batch.frames]


def unpack_rgb_frames(batch: common_pb2.FrameBatch | FrameBatchView) -> tuple[Frames, list[int], list[int]]:
    """unpack_frames's frames as (n, H, W, 3) RGB whatever the batch carried, for receivers that read colours."""
    frames, indices, stamps = unpack_frames(batch)
    if batch.frames and describe_frames(frames)[0] == "nv12":
        frames = nv12_to_rgb(frames)
    return frames, indices, stamps

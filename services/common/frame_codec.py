"""Packs numpy RGB frames into FrameBatch messages and back, checking sizes on the way in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from services.common.errors import InvalidArgument
from swapline.common.v1 import common_pb2

Frames = NDArray[np.uint8]  # (count, height, width, 3) RGB


def pack_frames(frames: Frames, indices: Sequence[int], pts: Sequence[int] | None = None) -> common_pb2.FrameBatch:
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise InvalidArgument(f"frames must be (count, height, width, 3), got {frames.shape}")
    if len(indices) != frames.shape[0]:
        raise InvalidArgument(f"{frames.shape[0]} frames but {len(indices)} indices")
    stamps = pts if pts is not None else [0] * len(indices)
    batch = common_pb2.FrameBatch(width=int(frames.shape[2]), height=int(frames.shape[1]))
    for frame, index, stamp in zip(frames, indices, stamps, strict=True):
        batch.frames.add(index=int(index), pts=int(stamp), rgb=np.ascontiguousarray(frame).tobytes())
    return batch


def unpack_frames(batch: common_pb2.FrameBatch) -> tuple[Frames, list[int], list[int]]:
    """Returns (frames, indices, pts); a frame whose byte count is off is an INVALID_ARGUMENT."""
    width, height = batch.width, batch.height
    if not batch.frames:
        return np.zeros((0, max(height, 0), max(width, 0), 3), np.uint8), [], []
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"frame batch has invalid size {width}x{height}")
    expected = width * height * 3
    buffer = np.empty((len(batch.frames), height, width, 3), np.uint8)
    for slot, frame in enumerate(batch.frames):
        if len(frame.rgb) != expected:
            raise InvalidArgument(
                f"frame {frame.index} has {len(frame.rgb)} bytes, expected {expected} for {width}x{height} RGB"
            )
        buffer[slot] = np.frombuffer(frame.rgb, np.uint8).reshape(height, width, 3)
    return buffer, [f.index for f in batch.frames], [f.pts for f in batch.frames]

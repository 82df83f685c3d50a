"""Decodes one keyframe-aligned frame range of a media file into batches of RGB or NV12 frames (pixel_formats)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import av
import av.error
import numpy as np

from services.common.errors import InvalidArgument
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import PixelFormat, fits_nv12, frame_bytes, frame_shape
from services.common.input_limits import DEFAULT_INPUT_LIMITS, InputLimits
from services.common.media_opener import open_media, shown_name
from services.common.media_probe import (
    check_picture_size,
    opening_options,
    picture_pixel_limit,
    video_stream,
)

# A batch of frames is at most this large unless a single frame is larger.
DEFAULT_MAX_BATCH_BYTES = 256 * 1024 * 1024

FrameBatch = tuple[Frames, list[int], list[int]]  # (frames in one pixel format, indices, pts)


def _decoded_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Iterator[av.VideoFrame]:
    for packet in container.demux(stream):
        yield from packet.decode()


def check_frame_range(start_frame: int, frame_count: int, batch_size: int) -> None:
    if start_frame < 0 or frame_count <= 0 or batch_size <= 0:
        raise InvalidArgument(
            f"frame range needs start_frame >= 0, frame_count > 0 and batch_size > 0; "
            f"got {start_frame}, {frame_count}, {batch_size}"
        )


def seek_mismatch_message(name: str, seek_pts: int, pts: int) -> str:
    return f"{name}: seek_pts {seek_pts} is not the timestamp of a frame (the next frame has pts {pts})"


def ends_short_message(name: str, next_index: int, end_index: int, frame_count: int) -> str:
    return (
        f"{name} is truncated or corrupt at frame {next_index}: the video ends "
        f"{end_index - next_index} of the {frame_count} requested frames short"
    )


# The sources NV12 holds exactly: 8-bit 4:2:0 in limited range, as x264 and most cameras write video.
NV12_EXACT_SOURCES = frozenset({"yuv420p"})
# FFmpeg's AVCOL_RANGE_JPEG, as PyAV's codec context gives color_range.
FULL_RANGE = 2


def is_full_range(source: str | None, color_range: int) -> bool:
    """JPEG-range luma and chroma: yuvj420p, or a stream tagged full range."""
    return source == "yuvj420p" or color_range == FULL_RANGE


def served_format(
    asked: PixelFormat, width: int, height: int, source: str | None = "yuv420p", full_range: bool = False
) -> PixelFormat:
    """The layout a request's frames come in: as asked, except RGB where NV12 would not hold the source's pixels as
    they are: odd sides, a source that is not 4:2:0 (an RGB picture: its colour would be halved in both directions) or
    one in full range (NV12 between services is limited range, so its levels would be squeezed)."""
    exact = fits_nv12(width, height) and source in NV12_EXACT_SOURCES and not full_range
    return "nv12" if asked == "nv12" and exact else "rgb24"


def batch_frames(batch_size: int, frame_count: int, frame_bytes: int, max_batch_bytes: int) -> int:
    """Frames per batch: as asked, but never past the range, nor past max_batch_bytes (at least one)."""
    return max(1, min(batch_size, frame_count, max_batch_bytes // max(1, frame_bytes)))


def iter_frame_batches(
    path: Path,
    start_frame: int,
    seek_pts: int,
    frame_count: int,
    batch_size: int,
    limits: InputLimits = DEFAULT_INPUT_LIMITS,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    pixel_format: PixelFormat = "rgb24",
) -> Generator[FrameBatch, None, None]:
    """Yields frames start_frame .. start_frame + frame_count - 1, up to batch_size at a time, in pixel_format
    (served_format: RGB where NV12 would not hold the source's pixels as they are).

    seek_pts is the presentation timestamp of start_frame as Probe reported it: decoding seeks
    back to the keyframe at or before it, and frames before it are dropped, so a range may start
    on any frame, though ranges that start on keyframes decode nothing twice.

    The picture size is checked against the limits before the batch buffer exists, and FFmpeg is
    told the same cap, so a frame whose bitstream claims more pixels than its headers is not decoded.
    """
    check_frame_range(start_frame, frame_count, batch_size)
    name = shown_name(path)
    with open_media(path, opening_options(limits)) as container:
        stream = video_stream(container, path)
        check_picture_size(container, stream, path, limits)
        stream.codec_context.options = {"max_pixels": str(picture_pixel_limit(container, limits))}
        stream.thread_type = "AUTO"
        context = stream.codec_context
        width, height = context.width, context.height
        source = context.format.name if context.format is not None else None
        served = served_format(pixel_format, width, height, source, is_full_range(source, context.color_range))
        frames_per_batch = batch_frames(batch_size, frame_count, frame_bytes(served, width, height), max_batch_bytes)
        next_index = start_frame
        end_index = start_frame + frame_count
        try:
            if start_frame > 0:
                container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
            buffer = np.empty((frames_per_batch, *frame_shape(served, width, height)), np.uint8)
            indices: list[int] = []
            stamps: list[int] = []
            for frame in _decoded_frames(container, stream):
                pts = frame.pts if frame.pts is not None else 0
                if pts < seek_pts:
                    continue
                if next_index == start_frame and pts != seek_pts:
                    raise InvalidArgument(seek_mismatch_message(name, seek_pts, pts))
                if (frame.width, frame.height) != (width, height):
                    raise InvalidArgument(
                        f"{name} changes size at frame {next_index} ({width}x{height} -> {frame.width}x{frame.height})"
                    )
                # NV12 is limited range, what the worker and the encoder read it as (served_format keeps full-range
                # sources in RGB). The RGB conversion takes the source's range into account.
                buffer[len(indices)] = frame.to_ndarray(format=served, dst_color_range="MPEG")
                indices.append(next_index)
                stamps.append(pts)
                next_index += 1
                if len(indices) == len(buffer) or next_index == end_index:
                    yield buffer[: len(indices)], indices, stamps
                    buffer = np.empty_like(buffer)
                    indices, stamps = [], []
                if next_index == end_index:
                    return
        except av.error.FFmpegError as error:
            raise InvalidArgument(f"{name} is truncated or corrupt at frame {next_index}: {error.strerror}") from None
        raise InvalidArgument(ends_short_message(name, next_index, end_index, frame_count))

"""Decodes one keyframe-aligned frame range of a media file into batches of RGB frames."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import av
import av.error
import numpy as np

from services.common.errors import InvalidArgument
from services.common.frame_codec import Frames
from services.decoder.media_probe import open_media, video_stream

FrameBatch = tuple[Frames, list[int], list[int]]  # (frames (n, H, W, 3) RGB, indices, pts)


def _decoded_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream
                    ) -> Iterator[av.VideoFrame]:
    for packet in container.demux(stream):
        yield from packet.decode()


def iter_frame_batches(
    path: Path, start_frame: int, seek_pts: int, frame_count: int, batch_size: int
) -> Generator[FrameBatch, None, None]:
    """Yields frames start_frame .. start_frame + frame_count - 1, batch_size at a time.

    seek_pts is the presentation timestamp of start_frame as Probe reported it: decoding seeks
    back to the keyframe at or before it, and frames before it are dropped, so a range may start
    on any frame, though ranges that start on keyframes decode nothing twice.
    """
    if start_frame < 0 or frame_count <= 0 or batch_size <= 0:
        raise InvalidArgument(
            f"frame range needs start_frame >= 0, frame_count > 0 and batch_size > 0; "
            f"got {start_frame}, {frame_count}, {batch_size}"
        )
    with open_media(path) as container:
        stream = video_stream(container, path)
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        next_index = start_frame
        end_index = start_frame + frame_count
        try:
            if start_frame > 0:
                container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
            buffer = np.empty((min(batch_size, frame_count), height, width, 3), np.uint8)
            indices: list[int] = []
            stamps: list[int] = []
            for frame in _decoded_frames(container, stream):
                pts = frame.pts if frame.pts is not None else 0
                if pts < seek_pts:
                    continue
                if next_index == start_frame and pts != seek_pts:
                    raise InvalidArgument(
                        f"{path.name}: seek_pts {seek_pts} is not the timestamp of a frame "
                        f"(the next frame has pts {pts})"
                    )
                if (frame.width, frame.height) != (width, height):
                    raise InvalidArgument(
                        f"{path.name} changes size at frame {next_index} "
                        f"({width}x{height} -> {frame.width}x{frame.height})"
                    )
                buffer[len(indices)] = frame.to_ndarray(format="rgb24")
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
            raise InvalidArgument(
                f"{path.name} is truncated or corrupt at frame {next_index}: {error.strerror}"
            ) from None
        raise InvalidArgument(
            f"{path.name} is truncated or corrupt at frame {next_index}: the video ends "
            f"{end_index - next_index} of the {frame_count} requested frames short"
        )

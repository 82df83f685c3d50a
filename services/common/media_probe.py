"""Reads what chunking needs from a media file: exact frame count and keyframes, without decoding.

Frame numbering is the rank of a video packet's presentation timestamp; a packet is a frame for
every codec swapline accepts (H.264/H.265/VP9/AV1 in MP4, MKV, WebM; single images).
Media past the input limits is refused from what the headers say, before a frame is decoded.
Shared by the decoder (Probe, and its readers), the benchmarks, and `swapline batch`, which checks that
an output it finds is complete.
"""

from __future__ import annotations

from pathlib import Path

import av
import av.error

from services.common.errors import InvalidArgument
from services.common.input_limits import DEFAULT_INPUT_LIMITS, InputLimits, check_media, check_pixels
from services.common.media_info import Keyframe, MediaInfo
from services.common.media_opener import open_media, shown_name

# Demuxers that read a single still picture.
IMAGE_FORMAT_SUFFIX = "_pipe"
IMAGE_FORMATS = frozenset({"image2", "webp", "apng"})


def is_image_format(format_name: str) -> bool:
    return format_name in IMAGE_FORMATS or format_name.endswith(IMAGE_FORMAT_SUFFIX)


def video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise InvalidArgument(f"{shown_name(path)} has no video stream; it is not a video or image")
    return container.streams.video[0]


def picture_pixel_limit(container: av.container.InputContainer, limits: InputLimits) -> int:
    return limits.max_image_pixels if is_image_format(container.format.name) else limits.max_video_pixels


def check_picture_size(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path, limits: InputLimits
) -> None:
    """The picture size the headers give, against the limit for the media's kind; nothing is decoded."""
    width, height = stream.codec_context.width, stream.codec_context.height
    what = f"picture of {shown_name(path)}"
    check_pixels(what, width, height, picture_pixel_limit(container, limits))


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def opening_options(limits: InputLimits) -> dict[str, str]:
    """FFmpeg may decode a frame while opening a file: its pixel cap holds from the first byte."""
    return {"max_pixels": str(max(limits.max_video_pixels, limits.max_image_pixels))}


def probe_media(path: Path, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> MediaInfo:
    """Demuxes every video packet once: frame count and keyframes are exact, not estimated.

    Limits are checked as early as the file shows them: the picture size and the duration the
    container states before the first packet, the frame count as soon as one packet too many is read.
    """
    name = shown_name(path)
    with open_media(path, opening_options(limits)) as container:
        stream = video_stream(container, path)
        check_picture_size(container, stream, path, limits)
        time_base = stream.time_base
        if time_base is None:
            raise InvalidArgument(f"{name} is truncated or corrupt: its video stream has no time base")
        image = is_image_format(container.format.name)
        stated_seconds = float(container.duration or 0) / av.time_base
        if not image and stated_seconds > limits.max_duration_seconds:
            raise InvalidArgument(
                f"{name} lasts {stated_seconds:.1f} s; the limit is {limits.max_duration_seconds:.1f} s"
            )
        stamps: list[tuple[int, bool]] = []
        packets_read = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets_read += 1
                if packet.is_discard:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                stamps.append((stamp if stamp is not None else len(stamps), packet.is_keyframe))
                if len(stamps) > limits.max_frames:
                    raise InvalidArgument(f"{name} has more than {limits.max_frames} frames, the limit")
        except av.error.FFmpegError as error:
            raise InvalidArgument(
                f"{name} is truncated or corrupt: reading packet {packets_read} failed ({error.strerror})"
            ) from None
        if stream.frames and packets_read < stream.frames:
            raise InvalidArgument(
                f"{name} is truncated or corrupt: its index lists {stream.frames} frames "
                f"but only {packets_read} could be read"
            )
        if not stamps:
            raise InvalidArgument(f"{name} is truncated or corrupt: its video stream holds no frames")
        stamps.sort()
        keyframes = tuple(Keyframe(index, pts) for index, (pts, key) in enumerate(stamps) if key)
        if not keyframes:
            raise InvalidArgument(f"{name} is truncated or corrupt: its video stream has no keyframe")
        if image:
            duration, fps = 0.0, 0.0
        elif stream.duration is not None:
            duration, fps = float(stream.duration * time_base), _frame_rate(stream)
        else:
            duration, fps = stated_seconds, _frame_rate(stream)
        info = MediaInfo(
            kind="image" if image else "video",
            duration_seconds=duration,
            fps=fps,
            frame_count=1 if image else len(stamps),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            has_audio=bool(container.streams.audio),
            keyframes=keyframes[:1] if image else keyframes,
            video_codec=stream.codec_context.name,
            time_base=(time_base.numerator, time_base.denominator),
        )
    check_media(info, name, limits)
    return info

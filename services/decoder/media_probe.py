"""Reads what chunking needs from a media file: exact frame count and keyframes, without decoding.

Frame numbering is the rank of a video packet's presentation timestamp; a packet is a frame for
every codec swapline accepts (H.264/H.265/VP9/AV1 in MP4, MKV, WebM; single images).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import BinaryIO

import av
import av.error
import av.logging

from services.common.errors import InvalidArgument
from services.common.media_info import Keyframe, MediaInfo

# Demuxers that read a single still picture.
IMAGE_FORMAT_SUFFIX = "_pipe"
IMAGE_FORMATS = frozenset({"image2", "webp", "apng"})
# Demuxers that render text files (ANSI art, .txt, .nfo) as pictures: text, not media.
TEXT_ART_FORMATS = frozenset({"tty", "bin", "adf", "idf", "xbin"})

_log_level_lock = threading.Lock()


class _NamelessReader:
    """A file FFmpeg can read but whose name it cannot see, so formats are probed by content alone."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def read(self, size: int) -> bytes:
        return self._handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()


def _open_failure_reason(path: Path) -> str | None:
    """FFmpeg's own explanation of why `path` does not open, or None when its content is no media.

    The name is hidden so that an extension (notes.mp4) cannot make a demuxer claim a text file.
    PyAV keeps FFmpeg's log switched off (its callback takes the GIL from codec threads), which
    also drops the reason from the exception; it is switched on only for this second attempt,
    with repeated-message suppression off so the same reason is reported for every bad file.
    """
    with _log_level_lock, path.open("rb") as handle:
        previous_level, previous_skip = av.logging.get_level(), av.logging.get_skip_repeated()
        av.logging.set_level(av.logging.ERROR)
        av.logging.set_skip_repeated(False)
        try:
            with av.logging.Capture(local=True) as logs, contextlib.suppress(av.error.FFmpegError):
                av.open(_NamelessReader(handle)).close()
        finally:
            av.logging.set_level(previous_level)
            av.logging.set_skip_repeated(previous_skip)
    messages = [message.strip() for _level, name, message in logs if name and message.strip()]
    return "; ".join(messages) or None


def open_media(path: Path) -> av.container.InputContainer:
    """Opens `path` for reading, turning every way it can fail into an InvalidArgument naming it."""
    if path.stat().st_size == 0:
        raise InvalidArgument(f"{path.name} is empty (0 bytes); it is not a video or image")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        reason = _open_failure_reason(path)
        if reason is None:
            raise InvalidArgument(f"{path.name} is not a video or image ({error.strerror})") from None
        raise InvalidArgument(f"{path.name} is truncated or corrupt: {reason}") from None
    if container.format.name in TEXT_ART_FORMATS:
        container.close()
        raise InvalidArgument(f"{path.name} is not a video or image (it holds text)")
    return container


def is_image_format(format_name: str) -> bool:
    return format_name in IMAGE_FORMATS or format_name.endswith(IMAGE_FORMAT_SUFFIX)


def video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise InvalidArgument(f"{path.name} has no video stream; it is not a video or image")
    return container.streams.video[0]


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_media(path: Path) -> MediaInfo:
    """Demuxes every video packet once: frame count and keyframes are exact, not estimated."""
    with open_media(path) as container:
        stream = video_stream(container, path)
        time_base = stream.time_base
        if time_base is None:
            raise InvalidArgument(f"{path.name} is truncated or corrupt: its video stream has no time base")
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
        except av.error.FFmpegError as error:
            raise InvalidArgument(
                f"{path.name} is truncated or corrupt: "
                f"reading packet {packets_read} failed ({error.strerror})"
            ) from None
        if stream.frames and packets_read < stream.frames:
            raise InvalidArgument(
                f"{path.name} is truncated or corrupt: its index lists {stream.frames} frames "
                f"but only {packets_read} could be read"
            )
        if not stamps:
            raise InvalidArgument(f"{path.name} is truncated or corrupt: its video stream holds no frames")
        stamps.sort()
        keyframes = tuple(Keyframe(index, pts) for index, (pts, key) in enumerate(stamps) if key)
        if not keyframes:
            raise InvalidArgument(f"{path.name} is truncated or corrupt: its video stream has no keyframe")
        image = is_image_format(container.format.name)
        if image:
            duration, fps = 0.0, 0.0
        elif stream.duration is not None:
            duration, fps = float(stream.duration * time_base), _frame_rate(stream)
        else:
            duration = float(container.duration or 0) / av.time_base
            fps = _frame_rate(stream)
        return MediaInfo(
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

"""Opens media files for reading with FFmpeg, turning every way that fails into an InvalidArgument.

Shared by the decoder (probing, reading frames) and the encoder (reading segments back).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import av
import av.error
import av.logging

from services.common.errors import InvalidArgument
from services.common.input_limits import excerpt

# Demuxers that render text files (ANSI art, .txt, .nfo) as pictures: text, not media.
TEXT_ART_FORMATS = frozenset({"tty", "bin", "adf", "idf", "xbin"})

# Options for a file read only for its packets (remuxed, or its frames counted): FFmpeg then decodes nothing while
# it opens the file, where it otherwise decodes a frame or more of each video stream to fill in parameters that a
# remux does not need, such as the pixel format (which is then left unknown). A 1080p segment opened in 5 ms
# instead of 64 on the development machine; a job's join opens every segment, and the encoder counts each one.
PACKETS_ONLY: Mapping[str, str] = {"skip_frame": "all"}

_log_level_lock = threading.Lock()


def shown_name(path: Path) -> str:
    """A file's name for messages: its start only, so a crafted name is never echoed whole."""
    return excerpt(path.name)


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


def open_media(path: Path, options: Mapping[str, str] | None = None) -> av.container.InputContainer:
    """Opens `path` for reading, turning every way it can fail into an InvalidArgument naming it.

    `options` go to FFmpeg's demuxer and decoders, e.g. {"max_pixels": "..."}: opening a file may
    decode a frame or two to find stream parameters, before any of the caller's own checks can run.
    """
    name = shown_name(path)
    if path.stat().st_size == 0:
        raise InvalidArgument(f"{name} is empty (0 bytes); it is not a video or image")
    try:
        container = av.open(str(path), options=dict(options or {}))
    except av.error.FFmpegError as error:
        reason = _open_failure_reason(path)
        if reason is None:
            raise InvalidArgument(f"{name} is not a video or image ({error.strerror})") from None
        raise InvalidArgument(f"{name} is truncated or corrupt: {reason}") from None
    if container.format.name in TEXT_ART_FORMATS:
        container.close()
        raise InvalidArgument(f"{name} is not a video or image (it holds text)")
    return container

"""Writes RGB frames into one H.264 MP4 segment (or one still image) with exact frame timestamps.

The file is written under a temporary name beside its path, unique to one writer, and renamed to the
path only once it is complete and read back: nobody sees half a segment, and two writers of the same
path (a stale lease and its successor) never share a file; the last complete rename wins.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

import av
import av.error
import cv2
import numpy as np

from services.common.encode_options import (
    MAX_FRAME_PIXELS,
    check_frame_size,
    checked_crf,
    checked_frame_rate,
    checked_preset,
)
from services.common.errors import Internal, InvalidArgument
from services.common.frame_codec import Frames
from services.common.input_limits import DEFAULT_MAX_FILENAME_LENGTH
from services.common.media_opener import open_media, shown_name
from services.common.media_paths import temporary_path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def count_video_frames(path: Path) -> int:
    """The frames of the file's first video stream, counted from its packets without decoding them."""
    with open_media(path) as container:
        if not container.streams.video:
            return 0
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0 and not packet.is_discard)


class SegmentWriter:
    """H.264 (libx264, yuv420p) in MP4: frame i gets pts i in a 1/fps time base.

    A path ending in .png, .jpg or .jpeg takes exactly one frame and writes it as that image.
    Everything is checked when the writer is made, before any file or encoder exists; the file is
    made at the first write. write, close and discard may be called from different threads: each
    waits for the one in progress, so discard never frees the muxer under a running write.
    """

    def __init__(
        self,
        path: Path,
        fps: float,
        width: int,
        height: int,
        crf: int,
        preset: str,
        threads: int = 0,
        max_pixels: int = MAX_FRAME_PIXELS,
    ) -> None:
        self.path = path
        self.width, self.height = width, height
        self.frames_written = 0
        self._image = is_image_path(path)
        if len(os.fsencode(path.name)) > DEFAULT_MAX_FILENAME_LENGTH:
            raise InvalidArgument(
                f"file name {shown_name(path)} is over the limit of {DEFAULT_MAX_FILENAME_LENGTH} bytes"
            )
        check_frame_size(width, height, video=not self._image, max_pixels=max_pixels)
        if not self._image:
            self._rate = checked_frame_rate(fps)
            self._options = {"crf": str(checked_crf(crf)), "preset": checked_preset(preset)}
        self._threads = threads
        self._temporary = temporary_path(path)
        self._lock = threading.Lock()
        self._container: av.container.OutputContainer | None = None
        self._stream: av.video.stream.VideoStream | None = None
        self._finished = False

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()

    def write(self, frames: Frames) -> None:
        """Appends a batch of (n, height, width, 3) RGB frames."""
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise InvalidArgument(
                f"{shown_name(self.path)} takes ({self.height}, {self.width}, 3) RGB frames, got {frames.shape[1:]}"
            )
        with self._lock:
            if self._finished:
                raise InvalidArgument(f"{shown_name(self.path)} is already closed")
            if self._image:
                self._write_image(frames)
                return
            container, stream = self._open()
            for frame in frames:
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                picture.pts = self.frames_written
                container.mux(stream.encode(picture))
                self.frames_written += 1

    def _open(self) -> tuple[av.container.OutputContainer, av.video.stream.VideoStream]:
        if self._container is not None and self._stream is not None:
            return self._container, self._stream
        self.path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(self._temporary), "w", format="mp4")
        try:
            stream = container.add_stream("libx264", rate=self._rate, options=self._options)
            stream.width, stream.height = self.width, self.height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = 1 / self._rate
            stream.codec_context.thread_count = self._threads
        except (av.error.FFmpegError, ValueError) as error:
            container.close()
            self._temporary.unlink(missing_ok=True)
            reason = error.strerror if isinstance(error, av.error.FFmpegError) else str(error)
            raise InvalidArgument(f"cannot set up the H.264 encoder for {shown_name(self.path)}: {reason}") from None
        self._container, self._stream = container, stream
        return container, stream

    def _write_image(self, frames: Frames) -> None:
        if self.frames_written + len(frames) > 1:
            raise InvalidArgument(f"{shown_name(self.path)} is an image and takes exactly one frame")
        if len(frames) == 0:
            return
        ok, encoded = cv2.imencode(self.path.suffix.lower(), cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR))
        if not ok:
            raise InvalidArgument(f"could not encode {shown_name(self.path)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temporary.write_bytes(encoded.tobytes())
        self.frames_written = 1

    def close(self) -> int:
        """Finishes the file, checks it holds every frame and renames it to its path; returns the frames.

        Closing again returns the same count. Nothing is left behind when it fails.
        """
        with self._lock:
            if self._finished:
                return self.frames_written
            self._finished = True
            try:
                self._finish()
            except BaseException:
                self._abandon()
                raise
            return self.frames_written

    def _finish(self) -> None:
        if self.frames_written == 0:
            raise InvalidArgument(f"{shown_name(self.path)}: no frames were written")
        if not self._image:
            container, stream = self._open()
            self._container = None
            try:
                container.mux(stream.encode(None))
            finally:
                container.close()
            found = count_video_frames(self._temporary)
            if found != self.frames_written:
                raise Internal(f"{shown_name(self.path)} holds {found} frames after {self.frames_written} were written")
        os.replace(self._temporary, self.path)

    def discard(self) -> None:
        """Abandons the segment: waits for a write in progress, then closes and deletes what was written.

        A segment already closed stays: it is complete, and a newer writer may have replaced it since.
        """
        with self._lock:
            if not self._finished:
                self._finished = True
                self._abandon()

    def _abandon(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            container.close()
        self._temporary.unlink(missing_ok=True)

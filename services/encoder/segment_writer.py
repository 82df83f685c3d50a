"""Writes RGB or NV12 frames into one H.264 MP4 segment (or one still image) with exact frame timestamps.

The file is written under a temporary name beside its path, unique to one writer, and renamed to the
path only once it is complete and read back: nobody sees half a segment, and two writers of the same
path (a stale lease and its successor) never share a file; the last complete rename wins.
"""

from __future__ import annotations

import os
import threading
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Protocol

import av
import av.error
import cv2
import numpy as np
from numpy.typing import NDArray

from services.common.encode_options import (
    MAX_FRAME_PIXELS,
    X264Preset,
    check_frame_size,
    checked_crf,
    checked_frame_rate,
    checked_preset,
)
from services.common.errors import Cancelled, Internal, InvalidArgument
from services.common.frames.frame_codec import Frames
from services.common.frames.pixel_formats import PixelFormat, describe_frames, nv12_to_rgb, rgb_to_i420
from services.common.input_limits import DEFAULT_MAX_FILENAME_LENGTH
from services.common.media_opener import PACKETS_ONLY, open_media, shown_name
from services.common.media_paths import temporary_path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def count_video_frames(path: Path) -> int:
    """The frames of the file's first video stream, counted from its packets without decoding them."""
    with open_media(path, PACKETS_ONLY) as container:
        if not container.streams.video:
            return 0
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0 and not packet.is_discard)


class VideoTrack(Protocol):
    """An H.264 encoder and the MP4 muxer it feeds, writing one temporary file."""

    def add(self, frame: NDArray[np.uint8], index: int) -> None:
        """Encodes one frame in the layout the track was opened for (pixel_formats), the segment's frame `index`."""

    def finish(self) -> None:
        """Flushes the encoder and closes the file, closing it even when the flush fails."""

    def abandon(self) -> None:
        """Closes the file without flushing; the caller deletes it."""


class X264Track:
    """libx264 fed yuv420p (from RGB frames) or NV12 as it comes; frame i gets pts i in a 1/fps time base.

    x264 takes NV12 itself (its own frames keep chroma interleaved), so NV12 frames reach it with no conversion;
    a 1080p NV12 frame encoded in 0.62 of the time a yuv420p stream fed NV12 frames took (the development machine).
    """

    def __init__(
        self,
        path: Path,
        shown: str,
        rate: Fraction,
        width: int,
        height: int,
        crf: int,
        preset: X264Preset,
        threads: int,
        pixel_format: PixelFormat = "rgb24",
    ) -> None:
        container = av.open(str(path), "w", format="mp4")
        self._nv12 = pixel_format == "nv12"
        try:
            stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
            stream.width, stream.height = width, height
            stream.pix_fmt = "nv12" if self._nv12 else "yuv420p"
            stream.codec_context.time_base = 1 / rate
            stream.codec_context.thread_count = threads
            # Frame threads, x264's own default. PyAV asks for slice threads, which cut every frame into slices:
            # lower latency, which a file has no use for, at some cost in compression and in efficiency.
            stream.codec_context.thread_type = "FRAME"
        except (av.error.FFmpegError, ValueError) as error:
            container.close()
            path.unlink(missing_ok=True)
            reason = error.strerror if isinstance(error, av.error.FFmpegError) else str(error)
            raise InvalidArgument(f"cannot set up the H.264 encoder for {shown}: {reason}") from None
        self._container, self._stream = container, stream

    def add(self, frame: NDArray[np.uint8], index: int) -> None:
        if self._nv12:
            picture = av.VideoFrame.from_ndarray(frame, format="nv12")
        else:
            picture = av.VideoFrame.from_ndarray(rgb_to_i420(frame), format="yuv420p")
        picture.pts = index
        self._container.mux(self._stream.encode(picture))

    def finish(self) -> None:
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def abandon(self) -> None:
        self._container.close()


class SegmentWriter:
    """H.264 in MP4, encoded by libx264 on `threads` threads (0: x264 picks); frame i gets pts i in 1/fps.

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
            self._crf, self._preset = checked_crf(crf), checked_preset(preset)
        self._threads = threads
        self._temporary = temporary_path(path)
        self._lock = threading.Lock()
        self._track: VideoTrack | None = None
        self._finished = False
        # Set by the first batch: a segment's frames all come in one layout.
        self._pixel_format: PixelFormat | None = None

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
        """Appends a batch of frames of the segment's size, (n, height, width, 3) RGB or NV12 (pixel_formats); every
        batch of a segment in the first one's layout."""
        pixel_format, width, height = describe_frames(frames)
        if (width, height) != (self.width, self.height):
            raise InvalidArgument(
                f"{shown_name(self.path)} takes {self.width}x{self.height} frames, got {width}x{height}"
            )
        with self._lock:
            if self._finished:
                raise InvalidArgument(f"{shown_name(self.path)} is already closed")
            if self._pixel_format not in (None, pixel_format):
                raise InvalidArgument(
                    f"{shown_name(self.path)} was started with {self._pixel_format} frames, got {pixel_format}"
                )
            self._pixel_format = pixel_format
            if self._image:
                self._write_image(frames)
                return
            track = self._open()
            for frame in frames:
                track.add(frame, self.frames_written)
                self.frames_written += 1

    def _open(self) -> VideoTrack:
        if self._track is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._track = self._open_track()
        return self._track

    @property
    def pixel_format(self) -> PixelFormat:
        """The layout of the segment's frames: the first batch's."""
        return self._pixel_format or "rgb24"

    def _open_track(self) -> VideoTrack:
        """The encoder and muxer, made at the first write; a writer on another encoder overrides this."""
        return X264Track(
            self._temporary,
            shown_name(self.path),
            self._rate,
            self.width,
            self.height,
            self._crf,
            self._preset,
            self._threads,
            self.pixel_format,
        )

    def _write_image(self, frames: Frames) -> None:
        if self.frames_written + len(frames) > 1:
            raise InvalidArgument(f"{shown_name(self.path)} is an image and takes exactly one frame")
        if len(frames) == 0:
            return
        rgb = nv12_to_rgb(frames)[0] if self.pixel_format == "nv12" else frames[0]
        ok, encoded = cv2.imencode(self.path.suffix.lower(), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise InvalidArgument(f"could not encode {shown_name(self.path)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temporary.write_bytes(encoded.tobytes())
        self.frames_written = 1

    def close(self, cancelled: threading.Event | None = None) -> int:
        """Finishes the file, checks it holds every frame and renames it to its path; returns the frames.

        Closing again returns the same count. Nothing is left behind when it fails, or when `cancelled` is set
        before the rename (Cancelled).
        """
        with self._lock:
            if self._finished:
                return self.frames_written
            self._finished = True
            try:
                self._finish(cancelled or threading.Event())
            except BaseException:
                self._abandon()
                raise
            return self.frames_written

    def _finish(self, cancelled: threading.Event) -> None:
        if self.frames_written == 0:
            raise InvalidArgument(f"{shown_name(self.path)}: no frames were written")
        if not self._image:
            track = self._open()
            self._track = None
            track.finish()
            found = count_video_frames(self._temporary)
            if found != self.frames_written:
                raise Internal(f"{shown_name(self.path)} holds {found} frames after {self.frames_written} were written")
        if cancelled.is_set():
            raise Cancelled(f"{shown_name(self.path)} was cancelled before it was complete")
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
        """The partial file goes even when closing the encoder fails (a muxer in a state FFmpeg refuses to
        close), which would otherwise leave it behind."""
        try:
            if self._track is not None:
                track, self._track = self._track, None
                track.abandon()
        finally:
            self._temporary.unlink(missing_ok=True)

"""Writes RGB frames into one H.264 MP4 segment (or one still image) with exact frame timestamps."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

import av
import av.error
import cv2
import numpy as np

from services.common.errors import InvalidArgument
from services.common.frame_codec import Frames

X264Preset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"
]
X264_PRESETS: tuple[X264Preset, ...] = get_args(X264Preset)
CRF_RANGE = range(0, 52)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# Frame rates such as 29.97 arrive as doubles; NTSC rates have denominator 1001.
MAX_RATE_DENOMINATOR = 1001


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def frame_rate(fps: float) -> Fraction:
    if not fps > 0:
        raise InvalidArgument(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(MAX_RATE_DENOMINATOR)


def checked_preset(preset: str) -> X264Preset:
    for known in X264_PRESETS:
        if known == preset:
            return known
    raise InvalidArgument(f"preset {preset!r} is not one of {', '.join(X264_PRESETS)}")


def checked_crf(crf: int) -> int:
    if crf not in CRF_RANGE:
        raise InvalidArgument(f"crf {crf} is outside {CRF_RANGE.start}..{CRF_RANGE.stop - 1}")
    return crf


class SegmentWriter:
    """H.264 (libx264, yuv420p) in MP4: frame i gets pts i in a 1/fps time base.

    A path ending in .png, .jpg or .jpeg takes exactly one frame and writes it as that image.
    Width and height must be even for video: yuv420p halves both for chroma, and neither x264 nor
    MP4 can carry the crop that padding by one pixel would need, so odd sizes are refused.
    """

    def __init__(
        self, path: Path, fps: float, width: int, height: int, crf: int, preset: str, threads: int = 0
    ) -> None:
        if width <= 0 or height <= 0:
            raise InvalidArgument(f"segment size must be positive, got {width}x{height}")
        self.path = path
        self.width, self.height = width, height
        self.frames_written = 0
        self._image = is_image_path(path)
        self._container: av.container.OutputContainer | None = None
        if self._image:
            return
        if width % 2 or height % 2:
            raise InvalidArgument(
                f"H.264 yuv420p needs an even width and height, got {width}x{height} for {path.name}"
            )
        rate = frame_rate(fps)
        options = {"crf": str(checked_crf(crf)), "preset": checked_preset(preset)}
        container = av.open(str(path), "w", format="mp4")
        try:
            stream = container.add_stream("libx264", rate=rate, options=options)
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = 1 / rate
            stream.codec_context.thread_count = threads
        except (av.error.FFmpegError, ValueError) as error:
            container.close()
            raise InvalidArgument(f"cannot set up the H.264 encoder for {path.name}: {error}") from None
        self._container = container
        self._stream = stream

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
                f"{self.path.name} takes ({self.height}, {self.width}, 3) RGB frames, got {frames.shape[1:]}"
            )
        if self._image:
            self._write_image(frames)
            return
        if self._container is None:
            raise InvalidArgument(f"{self.path.name} is already closed")
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = self.frames_written
            self._container.mux(self._stream.encode(picture))
            self.frames_written += 1

    def _write_image(self, frames: Frames) -> None:
        if self.frames_written + len(frames) > 1:
            raise InvalidArgument(f"{self.path.name} is an image and takes exactly one frame")
        if len(frames) == 0:
            return
        ok, encoded = cv2.imencode(self.path.suffix.lower(), cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR))
        if not ok:
            raise InvalidArgument(f"could not encode {self.path.name}")
        self.path.write_bytes(encoded.tobytes())
        self.frames_written = 1

    def close(self) -> int:
        """Flushes the encoder and finishes the file; returns the frames written."""
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.mux(self._stream.encode(None))
            finally:
                container.close()
        return self.frames_written

    def discard(self) -> None:
        """Abandons the segment: closes without flushing and deletes what was written."""
        if self._container is not None:
            container, self._container = self._container, None
            container.close()
        self.path.unlink(missing_ok=True)

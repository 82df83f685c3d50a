"""A stand-in for PyNvVideoCodec's SimpleDecoder on the CPU: PyAV's RGB or NV12 frames behind the same calls.

It serves frames the way the documented API does (host memory read through GetPtrToPlane(0) and
framesize(), timestamps in DecodedFrame.timestamp, seek_to_index then get_batch_frames, reconfigure_decoder to
point it at another file), so the NVDEC
reader's own logic runs here; only the GPU's decoding is replaced.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from services.common.frames.pixel_formats import PixelFormat


@dataclass
class FakeDecodedFrame:
    pixels: np.ndarray
    timestamp: int

    def framesize(self) -> int:
        return int(self.pixels.nbytes)

    def GetPtrToPlane(self, plane_index: int) -> int:  # the library's name
        assert plane_index == 0
        return int(self.pixels.ctypes.data)


@dataclass
class FakeSimpleDecoder:
    frames: list[FakeDecodedFrame]
    # Raise from get_batch_frames once this many frames have been handed out.
    fail_after: int | None = None
    calls: list[tuple[str, int]] = field(default_factory=list)
    # When given, a seek to frame 0 (the shift's measurement) sets `seeking_start` and waits for it.
    hold_start: threading.Event | None = None
    seeking_start: threading.Event = field(default_factory=threading.Event)
    _position: int = 0

    def reconfigure_decoder(self, new_source: str) -> None:
        self.calls.append(("reconfigure_decoder", 0))
        self._position = 0

    def __len__(self) -> int:
        return len(self.frames)

    def seek_to_index(self, index: int) -> None:
        self.calls.append(("seek_to_index", index))
        if index == 0 and self.hold_start is not None:
            self.seeking_start.set()
            if not self.hold_start.wait(timeout=30):
                raise TimeoutError("the test never let the seek to frame 0 go on")
        if not 0 <= index < len(self.frames):
            raise IndexError(f"Index {index} is out of range [0, {len(self.frames) - 1}]")
        self._position = index

    def get_batch_frames(self, batch_size: int) -> list[FakeDecodedFrame]:
        self.calls.append(("get_batch_frames", batch_size))
        if self.fail_after is not None and self._position + batch_size > self.fail_after:
            raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED")
        batch = self.frames[self._position : self._position + batch_size]
        self._position += len(batch)
        return batch


def pyav_frames(path: Path, pixel_format: PixelFormat = "rgb24") -> list[FakeDecodedFrame]:
    with av.open(str(path)) as container:
        return [
            FakeDecodedFrame(np.ascontiguousarray(frame.to_ndarray(format=pixel_format)), frame.pts or 0)
            for frame in container.decode(video=0)
        ]


@dataclass
class FakeOpener:
    """Opens FakeSimpleDecoders over the same frames (those of the layout asked for) and keeps them, to look at their
    calls."""

    frames: list[FakeDecodedFrame]
    fail_after: int | None = None
    opened: list[FakeSimpleDecoder] = field(default_factory=list)
    # Given to the first decoder opened: see FakeSimpleDecoder.hold_start.
    hold_first_start: threading.Event | None = None
    # The frames served to a decoder opened for NV12.
    nv12_frames: list[FakeDecodedFrame] | None = None
    asked: list[PixelFormat] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, path: Path, gpu_id: int, pixel_format: PixelFormat) -> FakeSimpleDecoder:
        frames = self.frames if pixel_format == "rgb24" else self.nv12_frames
        assert frames is not None, f"the test gave no {pixel_format} frames"
        with self._changed:
            hold = self.hold_first_start if not self.opened else None
            decoder = FakeSimpleDecoder(frames, self.fail_after, hold_start=hold)
            self.asked.append(pixel_format)
            self.opened.append(decoder)
            self._changed.notify_all()
        return decoder

    def decoder(self, number: int, timeout: float = 30.0) -> FakeSimpleDecoder:
        """Decoder `number` (from 0), waiting until the reader has opened it."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.opened) > number, timeout):
                raise TimeoutError(f"decoder {number} was never opened")
            return self.opened[number]


@dataclass
class FakeOpenerFailure:
    """An opener that fails as PyNvVideoCodec does where NVDEC cannot open the file (or is absent)."""

    error: Exception
    attempts: int = 0

    def __call__(self, path: Path, gpu_id: int, pixel_format: PixelFormat) -> FakeSimpleDecoder:
        self.attempts += 1
        raise self.error

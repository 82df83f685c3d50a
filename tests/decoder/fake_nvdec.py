"""A stand-in for PyNvVideoCodec's SimpleDecoder on the CPU: PyAV's RGB or NV12 frames behind the same calls.

It serves frames the way the documented API does in device-memory mode (planes listed by DecodedFrame.cuda()
with their CUDA array interfaces, framesize(), timestamps in DecodedFrame.timestamp, seek_to_index then
get_batch_frames, reconfigure_decoder to point it at another file), and FakeCudaDriver answers the driver
calls the copier makes, with host addresses for device pointers. So the NVDEC reader's own logic and its
copies from pitched planes run here; only the GPU's decoding and memory are replaced.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

from services.common.frames.pixel_formats import PixelFormat
from services.decoder.cuda_copier import CudaFrameCopier
from services.decoder.nvdec_reader import DeviceMemoryDecoder

# Bytes past each row of a plane, as a pitched GPU surface has, so that a copy ignoring the pitch goes wrong.
PITCH_PADDING = 64


@dataclass
class FakePlane:
    """A plane of `shape` (rows, columns, channels) stored in rows of `pitched`, whose ends are padding."""

    pitched: np.ndarray
    shape: tuple[int, int, int]

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "strides": (self.pitched.shape[1], self.shape[2], 1),
            "typestr": "|u1",
            "data": (int(self.pitched.ctypes.data), False),
            "version": 3,
        }


def pitched_plane(pixels: np.ndarray, shape: tuple[int, int, int]) -> FakePlane:
    rows, row_bytes = shape[0], shape[1] * shape[2]
    pitched = np.full((rows, row_bytes + PITCH_PADDING), 0xA5, np.uint8)
    pitched[:, :row_bytes] = pixels.reshape(rows, row_bytes)
    return FakePlane(pitched, shape)


def device_planes(pixels: np.ndarray) -> list[FakePlane]:
    """NVDEC's planes for a frame: RGB (H, W, 3) is one; NV12 (H * 3 / 2, W) is luma and interleaved chroma."""
    if pixels.ndim == 3:
        height, width, _ = pixels.shape
        return [pitched_plane(pixels, (height, width, 3))]
    height, width = pixels.shape[0] * 2 // 3, pixels.shape[1]
    return [
        pitched_plane(pixels[:height], (height, width, 1)),
        pitched_plane(pixels[height:], (height // 2, width // 2, 2)),
    ]


@dataclass
class FakeDecodedFrame:
    pixels: np.ndarray
    timestamp: int
    planes: list[FakePlane] = field(init=False)

    def __post_init__(self) -> None:
        self.planes = device_planes(self.pixels)

    def framesize(self) -> int:
        return int(self.pixels.nbytes)

    def cuda(self) -> list[FakePlane]:
        return self.planes


@dataclass
class FakeCudaDriver:
    """The CUDA driver calls CudaFrameCopier makes, on host memory; `failing` names a call that fails."""

    failing: str | None = None
    current_context: int | None = None
    copies: int = 0

    def _result(self, name: str) -> int:
        return CUDA_ERROR_ILLEGAL_ADDRESS if name == self.failing else 0

    def cuInit(self, flags: int) -> int:
        return self._result("cuInit")

    def cuDeviceGet(self, device: Any, ordinal: int) -> int:
        device._obj.value = ordinal
        return self._result("cuDeviceGet")

    def cuDevicePrimaryCtxRetain(self, context: Any, device: ctypes.c_int) -> int:
        context._obj.value = 0x1000 + device.value
        return self._result("cuDevicePrimaryCtxRetain")

    def cuCtxSetCurrent(self, context: ctypes.c_void_p) -> int:
        self.current_context = context.value
        return self._result("cuCtxSetCurrent")

    def cuMemcpy2D_v2(self, copy: Any) -> int:
        if self.current_context is None:
            return CUDA_ERROR_INVALID_CONTEXT
        if self.failing == "cuMemcpy2D_v2":
            return CUDA_ERROR_ILLEGAL_ADDRESS
        description = copy._obj
        for row in range(description.Height):
            ctypes.memmove(
                description.dstHost + row * description.dstPitch,
                description.srcDevice + row * description.srcPitch,
                description.WidthInBytes,
            )
        self.copies += 1
        return 0

    def cuGetErrorName(self, result: int, text: Any) -> int:
        text._obj.value = ERROR_NAMES[result]
        return 0


CUDA_ERROR_INVALID_CONTEXT, CUDA_ERROR_ILLEGAL_ADDRESS = 201, 700
ERROR_NAMES = {
    CUDA_ERROR_INVALID_CONTEXT: b"CUDA_ERROR_INVALID_CONTEXT",
    CUDA_ERROR_ILLEGAL_ADDRESS: b"CUDA_ERROR_ILLEGAL_ADDRESS",
}


def fake_copier(driver: FakeCudaDriver, gpu_id: int = 0) -> CudaFrameCopier:
    return CudaFrameCopier(gpu_id, load=lambda library: driver)


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
    driver: FakeCudaDriver = field(default_factory=FakeCudaDriver)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, path: Path, gpu_id: int, pixel_format: PixelFormat) -> DeviceMemoryDecoder:
        frames = self.frames if pixel_format == "rgb24" else self.nv12_frames
        assert frames is not None, f"the test gave no {pixel_format} frames"
        with self._changed:
            hold = self.hold_first_start if not self.opened else None
            decoder = FakeSimpleDecoder(frames, self.fail_after, hold_start=hold)
            self.asked.append(pixel_format)
            self.opened.append(decoder)
            self._changed.notify_all()
        return DeviceMemoryDecoder(decoder, fake_copier(self.driver, gpu_id))

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

    def __call__(self, path: Path, gpu_id: int, pixel_format: PixelFormat) -> DeviceMemoryDecoder:
        self.attempts += 1
        raise self.error

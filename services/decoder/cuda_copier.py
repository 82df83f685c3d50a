"""Copies NVDEC's frames from GPU memory to host arrays through the CUDA driver API (libcuda, by ctypes).

PyNvVideoCodec's host-memory mode copies each frame into a buffer of its own, which the reader then copies
again: 2.2-2.8 ms of CPU a 1080p NV12 frame on the H200 machine, read at under 1 GB/s. Leaving frames in GPU
memory and copying each plane once with cuMemcpy2D into the batch costs 1.1-1.2 ms (the probe in
docs/benchmarks.md, "NVDEC frames to host memory, three ways").

A frame's planes are described by their CUDA array interface (DecodedFrame.cuda(): data pointer, shape
(rows, columns, channels), strides); each plane is copied row by row at its pitch, so pitched surfaces copy
as correctly as packed ones. The copy needs the decoder's CUDA context current in the calling thread: the
decoder runs in the device's primary context, which the copier retains once per process and makes current
before each copy, since a request's steps run on whichever executor thread is free.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.common.cuda_waiting import CUDA_DRIVER_LIBRARY
from services.common.errors import FailedPrecondition

# CUmemorytype values from cuda.h.
_MEMORY_HOST, _MEMORY_DEVICE = 1, 2


class CudaCopyError(FailedPrecondition):
    """The CUDA driver refused a call; the message names the call and the driver's error."""


class CudaPlane(Protocol):
    """One plane of a frame in GPU memory, as PyNvVideoCodec's DecodedFrame.cuda() lists them."""

    @property
    def __cuda_array_interface__(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class PlaneLayout:
    """Where a plane lies in GPU memory: `rows` rows of `row_bytes` bytes, one every `pitch` bytes."""

    pointer: int
    rows: int
    row_bytes: int
    pitch: int


def plane_layout(interface: Mapping[str, Any]) -> PlaneLayout:
    """A plane's layout from its CUDA array interface: uint8, (rows, columns[, channels]), pixels packed in a row."""
    shape = tuple(int(side) for side in interface["shape"])
    if interface.get("typestr") != "|u1" or len(shape) not in (2, 3):
        raise CudaCopyError(f"a decoded plane is {interface.get('typestr')} of shape {shape}, not uint8 rows")
    row_bytes = shape[1] * (shape[2] if len(shape) == 3 else 1)
    strides = interface.get("strides")
    pitch = row_bytes if strides is None else int(strides[0])
    packed_pixels = strides is None or tuple(int(step) for step in strides[1:]) == tuple(
        int(np.prod(shape[axis + 1 :])) for axis in range(1, len(shape))
    )
    if not packed_pixels or pitch < row_bytes:
        raise CudaCopyError(f"a decoded plane's strides {strides} do not fit its shape {shape}")
    return PlaneLayout(int(interface["data"][0]), shape[0], row_bytes, pitch)


class _Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D from cuda.h."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t),
        ("srcY", ctypes.c_size_t),
        ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64),
        ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t),
        ("dstY", ctypes.c_size_t),
        ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64),
        ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t),
        ("Height", ctypes.c_size_t),
    ]


class CudaFrameCopier:
    """Copies frames of one GPU's primary context to the host."""

    def __init__(self, gpu_id: int, load: Callable[[str], Any] = ctypes.CDLL) -> None:
        try:
            self._cuda = load(CUDA_DRIVER_LIBRARY)
        except OSError as error:
            raise CudaCopyError(f"{CUDA_DRIVER_LIBRARY} does not load ({error})") from None
        self._call("cuInit", 0)
        device = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(device), gpu_id)
        self._context = ctypes.c_void_p()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self._context), device)

    def _call(self, name: str, *arguments: object) -> None:
        result = int(getattr(self._cuda, name)(*arguments))
        if result != 0:
            text = ctypes.c_char_p()
            self._cuda.cuGetErrorName(result, ctypes.byref(text))
            raise CudaCopyError(f"{name} failed: {(text.value or b'CUDA error').decode()} ({result})")

    def copy_planes(self, planes: Sequence[CudaPlane], out: np.ndarray) -> None:
        """The planes one after another into `out` (C-contiguous uint8 of exactly their packed size)."""
        layouts = [plane_layout(plane.__cuda_array_interface__) for plane in planes]
        packed = sum(layout.rows * layout.row_bytes for layout in layouts)
        if not out.flags.c_contiguous or out.dtype != np.uint8 or out.nbytes != packed:
            raise CudaCopyError(f"the decoded planes hold {packed} bytes, the host frame {out.nbytes}")
        self._call("cuCtxSetCurrent", self._context)
        offset = 0
        for layout in layouts:
            copy = _Memcpy2D(
                srcMemoryType=_MEMORY_DEVICE,
                srcDevice=layout.pointer,
                srcPitch=layout.pitch,
                dstMemoryType=_MEMORY_HOST,
                dstHost=out.ctypes.data + offset,
                dstPitch=layout.row_bytes,
                WidthInBytes=layout.row_bytes,
                Height=layout.rows,
            )
            self._call("cuMemcpy2D_v2", ctypes.byref(copy))
            offset += layout.rows * layout.row_bytes


_COPIERS: dict[int, CudaFrameCopier] = {}
_COPIERS_LOCK = threading.Lock()


def frame_copier(gpu_id: int) -> CudaFrameCopier:
    """This process's copier for the GPU, made on first use (the primary context is retained once)."""
    with _COPIERS_LOCK:
        copier = _COPIERS.get(gpu_id)
        if copier is None:
            copier = _COPIERS[gpu_id] = CudaFrameCopier(gpu_id)
        return copier

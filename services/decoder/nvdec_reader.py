"""Decodes one keyframe-aligned frame range on NVDEC (PyNvVideoCodec) into batches of RGB or NV12 frames in host memory.

The contract is frame_reader.iter_frame_batches's: the same arguments, the same checks, the same
(frames (n, H, W, 3) RGB, indices, pts) batches and the same messages. The headers are read with PyAV
first, so the input limits hold before NVDEC allocates anything, and a stream NVDEC does not take is
refused (NvdecUnsupported) without opening a decoder session.

Written against PyNvVideoCodec 2.2's SimpleDecoder, as documented in the API reference
(https://docs.nvidia.com/video-technologies/pynvvideocodec/pynvc-api-reference/index.html, "SimpleDecoder"):
- output_color_type=OutputColorType.RGB gives interleaved RGB (H, W, 3) frames, converted on the GPU, and
  OutputColorType.NATIVE the decoder's own NV12 surface (H * 3 / 2 rows of W bytes, 1.5 bytes a pixel: seen on
  the H200 machine), which halves the copy to the host and needs no conversion;
- use_device_memory=True leaves each frame in GPU memory, its planes listed with their CUDA array interfaces by
  DecodedFrame.cuda(); cuda_copier copies them into the batch with one cuMemcpy2D a plane (half the CPU of
  use_device_memory=False, whose host buffer the reader had to copy again), and framesize() gives the frame's
  bytes;
- seek_to_index(i) then get_batch_frames(n) returns frames i .. i + n - 1 (fewer at the end of the stream),
  each with its presentation timestamp in DecodedFrame.timestamp. Those timestamps ignore an MP4 edit
  list, which PyAV (and so Probe's seek_pts) applies: x264's B-frame delay puts frame 0 at -1024 in
  NVDEC's units where PyAV says 0 (seen on the H200 machine, 2026-12-01). The reader therefore maps
  NVDEC's timestamps onto PyAV's by the stream's own shift: the stream's start time in the headers
  less NVDEC's timestamp of frame 0;
- a frame's memory belongs to the decoder and is reused by its next call, so it is copied out at once;
- reconfigure_decoder(path) points an open decoder at another file, keeping its NVDEC session. A new session
  costs its first decode about 80 ms (25 frames of 1080p: 147 ms in a new session, 69 ms in a reconfigured one,
  `python -m services.bench.nvdec_profile` on the H200 machine), a third of a one-second chunk's decode, so
  finished decoders wait in a pool (DecoderPool) for the next request.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, ParamSpec, Protocol, TypeVar, cast

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument, SwaplineError
from services.common.frames.pixel_formats import PixelFormat, frame_bytes, frame_shape
from services.common.input_limits import DEFAULT_INPUT_LIMITS, InputLimits
from services.common.media_opener import open_media, shown_name
from services.common.media_probe import check_picture_size, opening_options, video_stream
from services.decoder.cuda_copier import CudaFrameCopier, CudaPlane, frame_copier
from services.decoder.frame_reader import (
    DEFAULT_MAX_BATCH_BYTES,
    FrameBatch,
    batch_frames,
    check_frame_range,
    ends_short_message,
    is_full_range,
    seek_mismatch_message,
    served_format,
)

NVDEC_MODULE = "PyNvVideoCodec"
# The codecs PyNvVideoCodec's documentation lists for decoding (FFmpeg's names); VP9 and the rest go to PyAV.
NVDEC_CODECS = frozenset({"h264", "hevc", "av1"})
# 8-bit 4:2:0 decodes to NV12 surfaces, whose RGB conversion gives uint8 frames like PyAV's rgb24; 10-bit,
# 4:2:2 and 4:4:4 streams stay on PyAV rather than depend on how each GPU generation converts them.
NVDEC_PIXEL_FORMATS = frozenset({"yuv420p", "yuvj420p"})

ResultT = TypeVar("ResultT")
ArgumentsP = ParamSpec("ArgumentsP")


class NvdecUnsupported(FailedPrecondition):
    """The stream is not one NVDEC decodes here (its codec or pixel format); nothing was opened."""


class NvdecOpenError(FailedPrecondition):
    """PyNvVideoCodec could not open a decoder session for the file, or not seek in it; nothing was decoded."""


class NvdecDecodeError(InvalidArgument):
    """Decoding on NVDEC failed part way, or gave frames that do not fit the request."""


class NvdecFrame(Protocol):
    """The part of PyNvVideoCodec's DecodedFrame this reader uses (RGB or NV12)."""

    @property
    def timestamp(self) -> int: ...

    def framesize(self) -> int: ...


class DeviceFrame(NvdecFrame, Protocol):
    """A DecodedFrame left in GPU memory."""

    def cuda(self) -> Sequence[CudaPlane]: ...


class SimpleDecoderCalls(Protocol):
    """The part of PyNvVideoCodec's SimpleDecoder this reader calls."""

    def __len__(self) -> int: ...

    def seek_to_index(self, index: int) -> None: ...

    def get_batch_frames(self, batch_size: int) -> Sequence[DeviceFrame]: ...

    def reconfigure_decoder(self, new_source: str) -> None: ...


class NvdecSource(Protocol):
    """A decoder session as the reader uses it: SimpleDecoder's calls, and how one of its frames reaches the host."""

    def __len__(self) -> int: ...

    def seek_to_index(self, index: int) -> None: ...

    def get_batch_frames(self, batch_size: int) -> Sequence[NvdecFrame]: ...

    def reconfigure_decoder(self, new_source: str) -> None: ...

    def copy_frame(self, frame: NvdecFrame, out: np.ndarray) -> None:
        """Copies the frame into `out`, a C-contiguous uint8 array of framesize() bytes."""
        ...


class DeviceMemoryDecoder:
    """A SimpleDecoder whose frames stay in GPU memory until copy_frame brings one to the host."""

    def __init__(self, decoder: SimpleDecoderCalls, copier: CudaFrameCopier) -> None:
        self._decoder = decoder
        self._copier = copier

    def __len__(self) -> int:
        return len(self._decoder)

    def seek_to_index(self, index: int) -> None:
        self._decoder.seek_to_index(index)

    def get_batch_frames(self, batch_size: int) -> Sequence[DeviceFrame]:
        return self._decoder.get_batch_frames(batch_size)

    def reconfigure_decoder(self, new_source: str) -> None:
        self._decoder.reconfigure_decoder(new_source)

    def copy_frame(self, frame: NvdecFrame, out: np.ndarray) -> None:
        self._copier.copy_planes(cast(DeviceFrame, frame).cuda(), out)


# (path, gpu_id, pixel format) -> an open decoder; tests hand in one that serves PyAV's frames.
NvdecOpener = Callable[[Path, int, PixelFormat], NvdecSource]
# PyNvVideoCodec's OutputColorType member for each layout.
_OUTPUT_COLOURS: dict[PixelFormat, str] = {"rgb24": "RGB", "nv12": "NATIVE"}


def open_simple_decoder(path: Path, gpu_id: int, pixel_format: PixelFormat) -> NvdecSource:
    nvc = importlib.import_module(NVDEC_MODULE)
    colour = getattr(nvc.OutputColorType, _OUTPUT_COLOURS[pixel_format])
    copier = frame_copier(gpu_id)
    decoder = nvc.SimpleDecoder(str(path), gpu_id=gpu_id, use_device_memory=True, output_color_type=colour)
    return DeviceMemoryDecoder(decoder, copier)


# Idle decoders kept per GPU and layout: a decoder process serves about this many chunks at once.
POOLED_DECODERS = 16
PoolKey = tuple[int, PixelFormat]


class DecoderPool:
    """Decoders that finished a request cleanly, kept with their NVDEC sessions for the next one.

    A request takes one and points it at its file (reconfigure_decoder), or opens a new one when none waits or
    repointing fails; only a decoder whose request ran to its end comes back, so one left mid-stream by an error
    or a cancelled call is dropped with its state.
    """

    def __init__(self, size: int = POOLED_DECODERS) -> None:
        self._size = size
        self._idle: dict[PoolKey, list[NvdecSource]] = {}
        self._lock = threading.Lock()

    def take(self, path: Path, gpu_id: int, pixel_format: PixelFormat, open_decoder: NvdecOpener) -> NvdecSource:
        name = shown_name(path)
        with self._lock:
            idle = self._idle.get((gpu_id, pixel_format), [])
            source = idle.pop() if idle else None
        if source is not None:
            try:
                source.reconfigure_decoder(str(path))
                return source
            except Exception:  # the library's own classes; a fresh session below gets the file's real verdict
                source = None
        opened: NvdecSource = _calling_nvdec(
            NvdecOpenError, f"{name}: NVDEC on GPU {gpu_id} could not open it", open_decoder, path, gpu_id, pixel_format
        )
        return opened

    def keep(self, source: NvdecSource, gpu_id: int, pixel_format: PixelFormat) -> None:
        with self._lock:
            idle = self._idle.setdefault((gpu_id, pixel_format), [])
            if len(idle) < self._size:
                idle.append(source)

    def idle(self) -> int:
        with self._lock:
            return sum(len(sources) for sources in self._idle.values())

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


DECODERS = DecoderPool()


@dataclass(frozen=True)
class StreamHeader:
    width: int
    height: int
    codec: str
    pixel_format: str | None
    # The first frame's presentation timestamp as PyAV gives it (edit list applied); None when unknown.
    start_pts: int | None = None
    # JPEG-range luma and chroma (yuvj420p, or a stream tagged full range), which NVDEC's NV12 keeps as it is.
    full_range: bool = False


def read_stream_header(path: Path, limits: InputLimits) -> StreamHeader:
    """The picture size, codec and pixel format the headers give, checked against the limits."""
    with open_media(path, opening_options(limits)) as container:
        stream = video_stream(container, path)
        check_picture_size(container, stream, path, limits)
        context = stream.codec_context
        pixel_format = context.format.name if context.format is not None else None
        full_range = is_full_range(pixel_format, context.color_range)
        return StreamHeader(context.width, context.height, context.name, pixel_format, stream.start_time, full_range)


def nvdec_refusal(codec: str, pixel_format: str | None) -> str | None:
    """Why NVDEC does not take a stream of this codec and pixel format, or None when it does. (A full-range stream is
    taken: served_format serves it as RGB, never as its own NV12 surface, whose levels NV12 between services would
    misread.)"""
    if codec not in NVDEC_CODECS:
        return f"its codec is {codec}; NVDEC here decodes {', '.join(sorted(NVDEC_CODECS))}"
    if pixel_format not in NVDEC_PIXEL_FORMATS:
        return f"its pixel format is {pixel_format}; NVDEC here decodes 8-bit 4:2:0 only"
    return None


def _calling_nvdec(
    error: type[SwaplineError],
    message: str,
    call: Callable[ArgumentsP, ResultT],
    *arguments: ArgumentsP.args,
    **keywords: ArgumentsP.kwargs,
) -> ResultT:
    """Runs one call into PyNvVideoCodec, turning whatever it raises into `error`.

    The library's exception classes live in the module itself (PyNvVCException...), which is not there to
    import where NVDEC is absent; whatever escapes a call is the library's or its binding's.
    """
    try:
        return call(*arguments, **keywords)
    except Exception as failure:
        raise error(f"{message} ({type(failure).__name__}: {failure})") from None


FILE_MEMO_SIZE = 256
FileKey = tuple[str, int, int]
MemoKey = TypeVar("MemoKey", bound=Hashable)
MemoValue = TypeVar("MemoValue")


class FileMemo(Generic[MemoKey, MemoValue]):
    """What was learnt about files, by a key that holds the file's (path, size, mtime): one answer a file.

    A job's chunks decode the same file and arrive together, so one stream finds the answer while the others of
    that file wait for it (`waiting` counts them), rather than all finding it at once; if finding it fails, the
    next waiter tries. Used for the timestamp shift (a seek to frame 0 and back: a quarter of the decoder's CPU on
    the H200 machine when every chunk measured it) and for the stream's headers (opening the file with PyAV, which
    decodes a frame: a fifth of the decoder's CPU when every chunk read them, py-spy on the H200 machine).
    """

    def __init__(self, size: int = FILE_MEMO_SIZE) -> None:
        self._size = size
        self._values: dict[MemoKey, MemoValue] = {}
        self._finding: set[MemoKey] = set()
        self._changed = threading.Condition()
        self.waiting = 0

    def value(self, key: MemoKey, find: Callable[[], MemoValue]) -> MemoValue:
        with self._changed:
            while key not in self._values and key in self._finding:
                self.waiting += 1
                self._changed.notify_all()
                self._changed.wait()
                self.waiting -= 1
            if key in self._values:
                return self._values[key]
            self._finding.add(key)
        try:
            found = find()
        finally:
            with self._changed:
                self._finding.discard(key)
                self._changed.notify_all()
        with self._changed:
            if len(self._values) >= self._size:
                del self._values[next(iter(self._values))]
            self._values[key] = found
        return found

    def wait_for_waiting(self, count: int, timeout: float) -> bool:
        """Whether `count` streams came to wait for another's answer within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self.waiting >= count, timeout)

    def clear(self) -> None:
        with self._changed:
            self._values.clear()


SHIFTS: FileMemo[FileKey, int] = FileMemo()
HEADERS: FileMemo[tuple[FileKey, InputLimits], StreamHeader] = FileMemo()


def forget_files() -> None:
    SHIFTS.clear()
    HEADERS.clear()


def _file_key(path: Path) -> FileKey:
    status = path.stat()
    return str(path.resolve()), status.st_size, status.st_mtime_ns


def _stream_header(path: Path, limits: InputLimits) -> StreamHeader:
    """read_stream_header's answer, read once per file and limits."""
    return HEADERS.value((_file_key(path), limits), lambda: read_stream_header(path, limits))


def _timestamp_shift(source: NvdecSource, header: StreamHeader, name: str, path: Path) -> int:
    """What turns NVDEC's timestamps into PyAV's: the headers' start time less NVDEC's stamp of frame 0."""
    start_pts = header.start_pts
    if start_pts is None:
        return 0
    return SHIFTS.value(_file_key(path), lambda: _measured_shift(source, start_pts, name))


def _measured_shift(source: NvdecSource, start_pts: int, name: str) -> int:
    _calling_nvdec(NvdecOpenError, f"{name}: NVDEC could not seek to frame 0", source.seek_to_index, 0)
    first = _calling_nvdec(NvdecDecodeError, f"{name}: NVDEC could not decode frame 0", source.get_batch_frames, 1)
    if not first:
        raise NvdecDecodeError(f"{name} is truncated or corrupt at frame 0: NVDEC gave no frame")
    return start_pts - first[0].timestamp


def iter_nvdec_frame_batches(
    path: Path,
    start_frame: int,
    seek_pts: int,
    frame_count: int,
    batch_size: int,
    limits: InputLimits = DEFAULT_INPUT_LIMITS,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    *,
    pixel_format: PixelFormat = "rgb24",
    gpu_id: int = 0,
    open_decoder: NvdecOpener = open_simple_decoder,
    pool: DecoderPool = DECODERS,
) -> Generator[FrameBatch, None, None]:
    """Yields frames start_frame .. start_frame + frame_count - 1, up to batch_size at a time, from NVDEC, in
    pixel_format (frame_reader.served_format: RGB where NV12 would not hold the source's pixels as they are).

    Raises NvdecUnsupported or NvdecOpenError before the first frame when NVDEC cannot take the file,
    NvdecDecodeError (an InvalidArgument) when decoding fails or ends short, and InvalidArgument for a bad
    range or media past the limits, as iter_frame_batches does.
    """
    check_frame_range(start_frame, frame_count, batch_size)
    name = shown_name(path)
    header = _stream_header(path, limits)
    width, height = header.width, header.height
    served = served_format(pixel_format, width, height, header.pixel_format, header.full_range)
    refusal = nvdec_refusal(header.codec, header.pixel_format)
    if refusal is not None:
        raise NvdecUnsupported(f"{name} cannot be decoded on NVDEC: {refusal}")
    frames_per_batch = batch_frames(batch_size, frame_count, frame_bytes(served, width, height), max_batch_bytes)
    source = pool.take(path, gpu_id, served, open_decoder)
    yield from _decoded_range(source, header, path, start_frame, seek_pts, frame_count, frames_per_batch, served)
    pool.keep(source, gpu_id, served)


def _decoded_range(
    source: NvdecSource,
    header: StreamHeader,
    path: Path,
    start_frame: int,
    seek_pts: int,
    frame_count: int,
    frames_per_batch: int,
    served: PixelFormat,
) -> Generator[FrameBatch, None, None]:
    name = shown_name(path)
    width, height = header.width, header.height
    size, shape = frame_bytes(served, width, height), frame_shape(served, width, height)
    end_index = start_frame + frame_count
    available = _calling_nvdec(NvdecOpenError, f"{name}: NVDEC could not count its frames", len, source)
    if start_frame >= available:
        raise NvdecDecodeError(ends_short_message(name, start_frame, end_index, frame_count))
    shift = _timestamp_shift(source, header, name, path)
    _calling_nvdec(
        NvdecOpenError, f"{name}: NVDEC could not seek to frame {start_frame}", source.seek_to_index, start_frame
    )
    next_index = start_frame
    previous_pts: int | None = None
    while next_index < end_index:
        wanted = min(frames_per_batch, end_index - next_index)
        decoded = _calling_nvdec(
            NvdecDecodeError,
            f"{name} is truncated or corrupt at frame {next_index}: NVDEC failed",
            source.get_batch_frames,
            wanted,
        )
        if len(decoded) < wanted:
            raise NvdecDecodeError(ends_short_message(name, next_index + len(decoded), end_index, frame_count))
        buffer = np.empty((wanted, *shape), np.uint8)
        indices: list[int] = []
        stamps: list[int] = []
        for frame in decoded[:wanted]:
            pts = frame.timestamp + shift
            if next_index == start_frame and pts != seek_pts:
                raise NvdecDecodeError(seek_mismatch_message(name, seek_pts, pts))
            if previous_pts is not None and pts <= previous_pts:
                raise NvdecDecodeError(
                    f"{name} is truncated or corrupt at frame {next_index}: NVDEC gave pts {pts} after {previous_pts}"
                )
            if frame.framesize() != size:
                raise NvdecDecodeError(
                    f"{name} changes size at frame {next_index} ({width}x{height} {served} is {size} bytes, "
                    f"NVDEC gave {frame.framesize()})"
                )
            _calling_nvdec(
                NvdecDecodeError,
                f"{name}: frame {next_index} could not be copied from the GPU",
                source.copy_frame,
                frame,
                buffer[len(indices)],
            )
            indices.append(next_index)
            stamps.append(pts)
            previous_pts = pts
            next_index += 1
        yield buffer, indices, stamps

"""Which decoder turns a request's frames into RGB: NVDEC (PyNvVideoCodec) where the node has it, PyAV elsewhere.

The backend is chosen once, at start-up, from SWAPLINE_DECODER_BACKEND:
- auto: NVDEC when PyNvVideoCodec imports, NVML sees the GPU and the driver's video library loads; PyAV
  otherwise. Under NVDEC, a file NVDEC does not take (its codec or pixel format), or one it fails to open or
  decode, is decoded by PyAV for that request, with the reason logged and counted;
- nvdec: the decoder refuses to start without NVDEC (FailedPrecondition naming what is missing), and a file
  NVDEC cannot decode fails its request;
- cpu: PyAV only; no GPU is touched.
The choice and its reason are logged once and exported as swapline_decoder_backend_info.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, get_args

import pynvml
from prometheus_client import Counter, Gauge

from services.common.errors import FailedPrecondition
from services.common.frames.pixel_formats import PixelFormat
from services.common.input_limits import InputLimits
from services.decoder.frame_reader import FrameBatch, iter_frame_batches
from services.decoder.nvdec_reader import (
    NVDEC_MODULE,
    NvdecDecodeError,
    NvdecOpener,
    NvdecOpenError,
    NvdecUnsupported,
    iter_nvdec_frame_batches,
    open_simple_decoder,
)

log = logging.getLogger(__name__)

DecodeBackend = Literal["auto", "nvdec", "cpu"]
DECODE_BACKENDS: tuple[DecodeBackend, ...] = get_args(DecodeBackend)
# What actually decodes: NVDEC, or PyAV on the CPU.
ActiveBackend = Literal["nvdec", "cpu"]
# Why an auto decoder on NVDEC handed a request to PyAV.
FallbackReason = Literal["unsupported_stream", "open_failed", "decode_failed"]
FALLBACK_REASONS: tuple[FallbackReason, ...] = get_args(FallbackReason)

# NVDEC's user-space library; the container runtime mounts it only with the driver's `video` capability.
NVCUVID_LIBRARY = "libnvcuvid.so.1"

BACKEND_INFO = Gauge(
    "swapline_decoder_backend_info",
    "The decoder backend chosen at start (value 1): requested, active, and why.",
    ["requested", "active", "reason"],
)
PYAV_FALLBACKS = Counter(
    "swapline_decoder_pyav_fallbacks_total",
    "Requests an auto decoder on NVDEC handed to PyAV, by reason.",
    ["reason"],
)
# Every reason is exported from the start, at 0, so a rate over it exists before the first fallback.
for _reason in FALLBACK_REASONS:
    PYAV_FALLBACKS.labels(_reason)


@dataclass(frozen=True)
class NvdecPresence:
    """What NVDEC needs on this node; each field is why that part is missing, or None when it is there."""

    module_missing: str | None = None
    gpu_missing: str | None = None
    video_driver_missing: str | None = None

    def missing(self) -> list[str]:
        return [reason for reason in (self.module_missing, self.gpu_missing, self.video_driver_missing) if reason]


@dataclass(frozen=True)
class BackendChoice:
    requested: DecodeBackend
    active: ActiveBackend
    reason: str


def nvdec_module_missing(module: str = NVDEC_MODULE) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{module} does not import ({error})"
    return None


def gpu_missing(gpu_id: int, nvml: ModuleType | Any = pynvml) -> str | None:
    """NVML's view of the node: no driver, no GPU, or fewer GPUs than gpu_id needs."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return f"NVML cannot be read, so no GPU is visible ({error})"
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as error:
        return f"NVML cannot count the GPUs ({error})"
    finally:
        nvml.nvmlShutdown()
    if gpu_id >= count:
        return f"GPU {gpu_id} is not visible (NVML sees {count})"
    return None


def video_driver_missing(library: str = NVCUVID_LIBRARY, load: Callable[[str], object] = ctypes.CDLL) -> str | None:
    try:
        load(library)
    except OSError as error:
        return (
            f"{library} does not load ({error}): the container lacks the driver's video capability "
            "(NVIDIA_DRIVER_CAPABILITIES must include video)"
        )
    return None


def probe_nvdec_presence(gpu_id: int) -> NvdecPresence:
    return NvdecPresence(nvdec_module_missing(), gpu_missing(gpu_id), video_driver_missing())


def choose_backend(requested: DecodeBackend, presence: NvdecPresence) -> BackendChoice:
    if requested == "cpu":
        return BackendChoice(requested, "cpu", "cpu was asked for: PyAV only")
    missing = presence.missing()
    if not missing:
        return BackendChoice(requested, "nvdec", f"{NVDEC_MODULE}, a GPU and {NVCUVID_LIBRARY} are present")
    reasons = "; ".join(missing)
    if requested == "nvdec":
        raise FailedPrecondition(
            f"SWAPLINE_DECODER_BACKEND=nvdec, but NVDEC cannot be used: {reasons}. "
            "Set it to auto to fall back to PyAV, or run the decoder where NVDEC is."
        )
    return BackendChoice(requested, "cpu", f"NVDEC is unavailable, so PyAV decodes: {reasons}")


def select_backend(
    requested: DecodeBackend, gpu_id: int, probe: Callable[[int], NvdecPresence] = probe_nvdec_presence
) -> BackendChoice:
    """The start-up choice, logged and exported once; FailedPrecondition when nvdec cannot be had."""
    choice = choose_backend(requested, NvdecPresence() if requested == "cpu" else probe(gpu_id))
    log.info("decoder backend: %s (%s requested): %s", choice.active, choice.requested, choice.reason)
    BACKEND_INFO.labels(choice.requested, choice.active, choice.reason).set(1)
    return choice


def _fallback_reason(failure: NvdecUnsupported | NvdecOpenError | NvdecDecodeError) -> FallbackReason:
    if isinstance(failure, NvdecUnsupported):
        return "unsupported_stream"
    if isinstance(failure, NvdecOpenError):
        return "open_failed"
    return "decode_failed"


def _without_first(batches: Iterator[FrameBatch], skipped: int) -> Generator[FrameBatch, None, None]:
    """The batches less their first `skipped` frames: those a failed NVDEC decode already delivered."""
    for frames, indices, stamps in batches:
        if skipped >= len(indices):
            skipped -= len(indices)
            continue
        yield frames[skipped:], indices[skipped:], stamps[skipped:]
        skipped = 0


def iter_decoded_batches(
    backend: BackendChoice,
    path: Path,
    start_frame: int,
    seek_pts: int,
    frame_count: int,
    batch_size: int,
    limits: InputLimits,
    max_batch_bytes: int,
    *,
    pixel_format: PixelFormat = "rgb24",
    gpu_id: int = 0,
    open_decoder: NvdecOpener = open_simple_decoder,
) -> Generator[FrameBatch, None, None]:
    """iter_frame_batches's batches, from the backend chosen at start.

    Under auto, whatever NVDEC cannot do for this file goes to PyAV, which also judges whether the file is
    corrupt; frames NVDEC already delivered are not delivered twice.
    """
    pyav = (path, start_frame, seek_pts, frame_count, batch_size, limits, max_batch_bytes)
    if backend.active == "cpu":
        yield from iter_frame_batches(*pyav, pixel_format=pixel_format)
        return
    nvdec = iter_nvdec_frame_batches(*pyav, pixel_format=pixel_format, gpu_id=gpu_id, open_decoder=open_decoder)
    if backend.requested == "nvdec":
        yield from nvdec
        return
    delivered = 0
    try:
        while True:
            try:
                batch = next(nvdec)
            except StopIteration:
                return
            except (NvdecUnsupported, NvdecOpenError, NvdecDecodeError) as failure:
                reason = _fallback_reason(failure)
                level = logging.INFO if reason == "unsupported_stream" else logging.WARNING
                # The failure's message names the file.
                log.log(level, "decoding with PyAV instead of NVDEC (%s): %s", reason, failure)
                PYAV_FALLBACKS.labels(reason).inc()
                yield from _without_first(iter_frame_batches(*pyav, pixel_format=pixel_format), delivered)
                return
            delivered += len(batch[1])
            yield batch
    finally:
        nvdec.close()

"""Which encoder writes the segments: NVENC (PyNvVideoCodec) where the node's GPU has it, libx264 elsewhere.

The backend is chosen once, at start-up, from SWAPLINE_ENCODER_BACKEND:
- auto: NVENC when PyNvVideoCodec imports and a tiny H.264 encode on this node's GPU works; libx264 otherwise
  (H100 and H200 have no NVENC: opening the session fails there). Still images are written by cv2 either way;
- nvenc: the encoder refuses to start without NVENC (FailedPrecondition saying why);
- libx264: libx264 only; no GPU is touched.
The choice and its reason are logged once and exported as swapline_encoder_backend_info.

Segments of one job are joined by remuxing, so they should come from one backend: the join refuses segments
whose stream parameters (SPS and PPS) differ, as those of two different encoders do.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, cast, get_args

import numpy as np
from prometheus_client import Gauge

from services.common.errors import FailedPrecondition
from services.encoder.nvenc_writer import NVENC_MODULE, NvencModule, open_session

log = logging.getLogger(__name__)

EncodeBackend = Literal["auto", "nvenc", "libx264"]
ENCODE_BACKENDS: tuple[EncodeBackend, ...] = get_args(EncodeBackend)
# What actually encodes the video segments.
ActiveBackend = Literal["nvenc", "libx264"]

# The probe: a few frames at a size every NVENC generation takes.
PROBE_WIDTH, PROBE_HEIGHT, PROBE_FRAMES = 320, 240, 3

BACKEND_INFO = Gauge(
    "swapline_encoder_backend_info",
    "The encoder backend chosen at start (value 1): requested, active, and why.",
    ["requested", "active", "reason"],
)


class NvencUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BackendChoice:
    requested: EncodeBackend
    active: ActiveBackend
    reason: str
    # PyNvVideoCodec, loaded, when NVENC is active.
    nvenc: NvencModule | None = None


def load_nvenc_module() -> NvencModule:
    return cast(NvencModule, importlib.import_module(NVENC_MODULE))


def probe_nvenc(load: Callable[[], NvencModule] = load_nvenc_module) -> NvencModule:
    """The loaded module, once a tiny H.264 encode on this node's GPU gave a bitstream; NvencUnavailable if not."""
    try:
        nvenc = load()
    except Exception as error:  # a missing module, or one whose import fails without a driver
        raise NvencUnavailable(f"{NVENC_MODULE} does not import ({type(error).__name__}: {error})") from None
    grey = np.full(PROBE_WIDTH * PROBE_HEIGHT * 3 // 2, 128, np.uint8)
    try:
        session = open_session(nvenc, PROBE_WIDTH, PROBE_HEIGHT, Fraction(25), 23, "veryfast")
        bitstream = b"".join(bytes(session.Encode(grey)) for _ in range(PROBE_FRAMES)) + bytes(session.EndEncode())
    except Exception as error:  # PyNvVideoCodec raises its own classes; any failure means no usable NVENC
        raise NvencUnavailable(
            f"no H.264 NVENC session works on this node's GPU ({type(error).__name__}: {error})"
        ) from None
    if not bitstream:
        raise NvencUnavailable("the NVENC probe encode returned no bitstream")
    return nvenc


def choose_backend(requested: EncodeBackend, probe: Callable[[], NvencModule] = probe_nvenc) -> BackendChoice:
    if requested == "libx264":
        return BackendChoice(requested, "libx264", "libx264 was asked for")
    try:
        nvenc = probe()
    except NvencUnavailable as unavailable:
        if requested == "nvenc":
            raise FailedPrecondition(
                f"SWAPLINE_ENCODER_BACKEND=nvenc, but NVENC cannot be used: {unavailable.reason}. "
                "Set it to auto to fall back to libx264, or run the encoder on a GPU with NVENC."
            ) from None
        return BackendChoice(requested, "libx264", f"NVENC is unavailable, so libx264 encodes: {unavailable.reason}")
    return BackendChoice(requested, "nvenc", "an H.264 NVENC session encoded on this node's GPU", nvenc)


def select_backend(requested: EncodeBackend, probe: Callable[[], NvencModule] = probe_nvenc) -> BackendChoice:
    """The start-up choice, logged and exported once; FailedPrecondition when nvenc cannot be had."""
    choice = choose_backend(requested, probe)
    log.info("encoder backend: %s (%s requested): %s", choice.active, choice.requested, choice.reason)
    BACKEND_INFO.labels(choice.requested, choice.active, choice.reason).set(1)
    return choice

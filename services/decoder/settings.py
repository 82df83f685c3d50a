"""Decoder settings, read from SWAPLINE_DECODER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.cuda_waiting import CudaWait
from services.common.frames.frame_memory import FrameMemorySettings
from services.common.input_limits import (
    DEFAULT_MAX_DURATION_SECONDS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_URI_LENGTH,
    DEFAULT_MAX_VIDEO_PIXELS,
    InputLimits,
    limits_from,
)
from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged
from services.decoder.decode_backend import DecodeBackend
from services.decoder.frame_reader import DEFAULT_MAX_BATCH_BYTES

ENV_PREFIX = "SWAPLINE_DECODER_"

# OpenCV refuses pictures past 2**30 pixels whatever it is told, FFmpeg a little later.
_PIXEL_CEILING = 2**30
# Linux's PATH_MAX.
_URI_CEILING = 4096


@dataclass(frozen=True, kw_only=True)
class DecoderSettings(ServerSettings, FrameMemorySettings):
    media_root: Path
    # Frames per streamed batch when a request leaves batch_size at 0: 8 frames of 1080p RGB
    # are about 50 MB, well inside the raised message limit.
    default_batch_size: int = ranged(8, ge=1, le=256)
    # The decode buffer never holds more than this (and always at least one frame), whatever batch
    # size a request asks for: two 8K frames, or 43 of 1080p.
    max_batch_bytes: int = ranged(DEFAULT_MAX_BATCH_BYTES, ge=1024 * 1024, le=2**31 - 1)
    # Probe refuses media past these, and Decode refuses to decode it: checked from the container's
    # headers before any frame is decoded (services/common/input_limits.py explains the defaults).
    max_video_pixels: int = ranged(DEFAULT_MAX_VIDEO_PIXELS, ge=1, le=_PIXEL_CEILING)
    max_image_pixels: int = ranged(DEFAULT_MAX_IMAGE_PIXELS, ge=1, le=_PIXEL_CEILING)
    max_frames: int = ranged(DEFAULT_MAX_FRAMES, ge=1, le=100_000_000)
    max_duration_seconds: float = ranged(DEFAULT_MAX_DURATION_SECONDS, gt=0.0, le=7 * 24 * 3600.0)
    max_uri_length: int = ranged(DEFAULT_MAX_URI_LENGTH, ge=1, le=_URI_CEILING)
    # auto: NVDEC where PyNvVideoCodec, a GPU and the driver's video library are present, PyAV otherwise
    # (and for any file NVDEC cannot take); nvdec: refuse to start without NVDEC; cpu: PyAV only.
    backend: DecodeBackend = "auto"
    # The GPU NVDEC decodes on, as CUDA numbers the GPUs this process sees.
    gpu_id: int = ranged(0, ge=0, le=63)
    # How threads wait for NVDEC and the copies from the GPU (services/common/cuda_waiting.py): block sleeps,
    # CUDA's own auto spins a core for as long as the GPU takes.
    cuda_wait: CudaWait = "block"

    @property
    def input_limits(self) -> InputLimits:
        return limits_from(self)

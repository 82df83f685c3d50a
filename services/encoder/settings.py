"""Encoder settings, read from SWAPLINE_ENCODER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.encode_options import CRF_RANGE, MAX_FRAME_PIXELS, X264Preset
from services.common.frames.frame_memory import FrameMemoryReceiverSettings
from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged
from services.encoder.encode_backend import EncodeBackend

ENV_PREFIX = "SWAPLINE_ENCODER_"


@dataclass(frozen=True, kw_only=True)
class EncoderSettings(ServerSettings, FrameMemoryReceiverSettings):
    media_root: Path
    # Used when a request leaves crf at 0 or preset empty; 20 is close to visually lossless.
    default_crf: int = ranged(20, ge=CRF_RANGE.start, le=CRF_RANGE.stop - 1)
    default_preset: X264Preset = "veryfast"
    # x264 threads per segment. 0: each segment gets the usable cores (affinity, capped by the cgroup's CPU
    # quota) divided by the segments open when it starts, at least one, so parallel segments share the cores.
    threads: int = ranged(0, ge=0, le=256)
    # Largest frame (width x height) a segment may have; a header asking for more is refused at once.
    max_frame_pixels: int = ranged(MAX_FRAME_PIXELS, ge=1, le=MAX_FRAME_PIXELS)
    # auto: NVENC where PyNvVideoCodec imports and an H.264 session works on this node's GPU, libx264
    # otherwise; nvenc: refuse to start without NVENC; libx264: never touch the GPU.
    backend: EncodeBackend = "auto"

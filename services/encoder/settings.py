"""Encoder settings, read from SWAPLINE_ENCODER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged
from services.encoder.segment_writer import X264Preset

ENV_PREFIX = "SWAPLINE_ENCODER_"


@dataclass(frozen=True, kw_only=True)
class EncoderSettings(ServerSettings):
    media_root: Path
    # Used when a request leaves crf at 0 or preset empty; 20 is close to visually lossless.
    default_crf: int = ranged(20, ge=0, le=51)
    default_preset: X264Preset = "veryfast"
    # Encoder threads per segment; 0 lets x264 pick one per core.
    threads: int = ranged(0, ge=0, le=256)

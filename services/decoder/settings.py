"""Decoder settings, read from SWAPLINE_DECODER_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged

ENV_PREFIX = "SWAPLINE_DECODER_"


@dataclass(frozen=True, kw_only=True)
class DecoderSettings(ServerSettings):
    media_root: Path
    # Frames per streamed batch when a request leaves batch_size at 0: 8 frames of 1080p RGB
    # are about 50 MB, well inside the raised message limit.
    default_batch_size: int = ranged(8, ge=1, le=256)

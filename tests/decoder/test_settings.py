from __future__ import annotations

from pathlib import Path

import pytest

from services.common.input_limits import DEFAULT_INPUT_LIMITS, InputLimits
from services.common.settings_loader import SettingsError, load_settings
from services.decoder.settings import ENV_PREFIX, DecoderSettings


def test_defaults_are_the_shared_input_limits() -> None:
    assert DecoderSettings(media_root=Path("m")).input_limits == DEFAULT_INPUT_LIMITS


def test_limits_are_read_from_the_environment() -> None:
    settings = load_settings(
        DecoderSettings,
        ENV_PREFIX,
        {
            "SWAPLINE_DECODER_MEDIA_ROOT": "m",
            "SWAPLINE_DECODER_MAX_VIDEO_PIXELS": "2073600",
            "SWAPLINE_DECODER_MAX_IMAGE_PIXELS": "1000000",
            "SWAPLINE_DECODER_MAX_FRAMES": "100",
            "SWAPLINE_DECODER_MAX_DURATION_SECONDS": "60",
            "SWAPLINE_DECODER_MAX_URI_LENGTH": "200",
        },
    )
    assert settings.input_limits == InputLimits(
        max_video_pixels=2073600,
        max_image_pixels=1000000,
        max_frames=100,
        max_duration_seconds=60.0,
        max_uri_length=200,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAX_VIDEO_PIXELS", "0"),
        ("MAX_IMAGE_PIXELS", str(2**31)),
        ("MAX_FRAMES", "0"),
        ("MAX_DURATION_SECONDS", "0"),
        ("MAX_URI_LENGTH", "5000"),
        ("MAX_BATCH_BYTES", "1000"),
    ],
)
def test_limits_out_of_range_are_refused(variable: str, value: str) -> None:
    environ = {"SWAPLINE_DECODER_MEDIA_ROOT": "m", f"SWAPLINE_DECODER_{variable}": value}
    with pytest.raises(SettingsError, match=f"SWAPLINE_DECODER_{variable}={value}"):
        load_settings(DecoderSettings, ENV_PREFIX, environ)

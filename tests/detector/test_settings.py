from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.settings_loader import load_settings
from services.detector.face_detector import DetectionDefaults
from services.detector.settings import ENV_PREFIX, DetectorSettings


def test_defaults_are_the_original_mtcnn_cascade_with_a_40_pixel_minimum_face() -> None:
    settings = load_settings(DetectorSettings, ENV_PREFIX, environ={})
    assert (settings.triton_url, settings.triton_timeout_seconds) == ("127.0.0.1:8001", 30.0)
    assert settings.detection_defaults() == DetectionDefaults(
        min_face_size=40, pnet_score=0.6, rnet_score=0.7, min_score=0.7, scale_factor=0.709
    )


def test_environment_overrides_reach_the_detector() -> None:
    environ = {
        "SWAPLINE_DETECTOR_TRITON_URL": "triton:8001",
        "SWAPLINE_DETECTOR_MIN_FACE_SIZE": "24",
        "SWAPLINE_DETECTOR_MIN_SCORE": "0.9",
        "SWAPLINE_DETECTOR_PORT": "50051",
    }
    settings = load_settings(DetectorSettings, ENV_PREFIX, environ=environ)
    assert (settings.triton_url, settings.port) == ("triton:8001", 50051)
    defaults = settings.detection_defaults()
    assert (defaults.min_face_size, defaults.min_score, defaults.rnet_score) == (24, 0.9, 0.7)


def test_out_of_range_threshold_is_refused_at_start() -> None:
    with pytest.raises(InvalidArgument, match=r"SWAPLINE_DETECTOR_SCALE_FACTOR=1\.5 must be at most"):
        load_settings(DetectorSettings, ENV_PREFIX, environ={"SWAPLINE_DETECTOR_SCALE_FACTOR": "1.5"})


def test_the_cascade_is_chosen_automatically_unless_set() -> None:
    assert load_settings(DetectorSettings, ENV_PREFIX, environ={}).cascade == "auto"
    environ = {"SWAPLINE_DETECTOR_CASCADE": "off"}
    assert load_settings(DetectorSettings, ENV_PREFIX, environ=environ).cascade == "off"


def test_an_unknown_cascade_mode_is_refused_at_start() -> None:
    with pytest.raises(InvalidArgument, match=r"SWAPLINE_DETECTOR_CASCADE='always' is not one of auto, on, off"):
        load_settings(DetectorSettings, ENV_PREFIX, environ={"SWAPLINE_DETECTOR_CASCADE": "always"})

from dataclasses import dataclass

import pytest

from services.common.settings_loader import SettingsError, ValidatedSettings, load_settings, ranged
from services.decoder.settings import DecoderSettings
from services.encoder.settings import EncoderSettings
from services.gateway.settings import GatewaySettings
from services.worker.settings import WorkerSettings

WORKER_TARGETS = {
    "SWAPLINE_WORKER_GATEWAY_TARGET": "g:1",
    "SWAPLINE_WORKER_DECODER_TARGET": "d:1",
    "SWAPLINE_WORKER_DETECTOR_TARGET": "x:1",
    "SWAPLINE_WORKER_ENCODER_TARGET": "e:1",
    "SWAPLINE_WORKER_TRITON_URL": "t:1",
}


@dataclass(frozen=True, kw_only=True)
class _Example(ValidatedSettings):
    count: int = ranged(1, ge=1, le=10)
    ratio: float = ranged(0.5, gt=0.0)
    name: str = ranged("a", max_length=3)


def test_defaults_are_in_range() -> None:
    assert _Example().count == 1


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("count", 0, "at least 1"),
        ("count", 11, "at most 10"),
        ("ratio", 0.0, "greater than 0"),
        ("name", "abcd", "at most 3 long"),
    ],
)
def test_out_of_range_values_are_refused_when_built(field: str, value: object, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        _Example(**{field: value})  # type: ignore[arg-type]


def test_an_environment_variable_out_of_range_is_named() -> None:
    with pytest.raises(SettingsError, match="SWAPLINE_WORKER_BATCH_SIZE=0 must be at least 1"):
        load_settings(WorkerSettings, "SWAPLINE_WORKER_", {**WORKER_TARGETS, "SWAPLINE_WORKER_BATCH_SIZE": "0"})


def test_worker_concurrency_zero_is_refused() -> None:
    with pytest.raises(SettingsError, match="CONCURRENCY"):
        load_settings(WorkerSettings, "SWAPLINE_WORKER_", {**WORKER_TARGETS, "SWAPLINE_WORKER_CONCURRENCY": "0"})


def test_service_settings_check_their_ranges() -> None:
    with pytest.raises(SettingsError, match="default_crf"):
        EncoderSettings(media_root="m", default_crf=60)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="default_batch_size"):
        DecoderSettings(media_root="m", default_batch_size=0)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="port"):
        GatewaySettings(media_root="m", decoder_target="", detector_target="", encoder_target="", port=70000)  # type: ignore[arg-type]


def test_an_unknown_literal_is_refused() -> None:
    with pytest.raises(SettingsError, match="TRANSPORT_SECURITY"):
        load_settings(
            DecoderSettings,
            "SWAPLINE_DECODER_",
            {"SWAPLINE_DECODER_MEDIA_ROOT": "m", "SWAPLINE_DECODER_TRANSPORT_SECURITY": "none"},
        )

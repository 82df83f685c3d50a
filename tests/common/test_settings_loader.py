import dataclasses
import importlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.common.server_settings import ServerSettings
from services.common.settings_loader import (
    BOUNDS_KEY,
    Bounds,
    SettingsError,
    ValidatedSettings,
    literal_choices,
    load_settings,
    ranged,
)
from services.decoder.settings import DecoderSettings
from services.encoder.settings import EncoderSettings
from services.gateway.settings import GatewaySettings
from services.worker.settings import WorkerSettings

SERVICES = Path(__file__).resolve().parents[2] / "services"
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


def settings_classes() -> list[type[Any]]:
    """Every service's settings dataclasses (services/*/settings.py), and the ServerSettings they share."""
    classes: list[type[Any]] = [ServerSettings]
    for path in sorted(SERVICES.glob("*/settings.py")):
        module = importlib.import_module(f"services.{path.parent.name}.settings")
        classes += [
            cls
            for cls in vars(module).values()
            if isinstance(cls, type)
            and dataclasses.is_dataclass(cls)
            and issubclass(cls, ValidatedSettings)
            and cls.__module__ == module.__name__
        ]
    return classes


def with_required_fields(cls: type[Any], **values: object) -> Any:
    """An instance with a placeholder for each field that has no default (targets, paths) and `values`."""
    hints = typing.get_type_hints(cls)
    required = {
        field.name: hints[field.name]("placeholder")
        for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    }
    return cls(**{**required, **values})


def test_the_settings_of_every_service_are_walked() -> None:
    services = {cls.__module__.split(".")[1] for cls in settings_classes() if cls is not ServerSettings}
    expected = {"advisor", "decoder", "detector", "encoder", "exporter", "gateway", "residency", "triton", "worker"}
    assert services >= expected


def test_every_numeric_setting_declares_its_range() -> None:
    """A minimum for every number, and a maximum for every int (floats are bounded by being finite)."""
    unbounded = []
    for cls in settings_classes():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            if kind not in (int, float):
                continue
            bounds = field.metadata.get(BOUNDS_KEY)
            if not isinstance(bounds, Bounds) or (bounds.ge is None and bounds.gt is None):
                unbounded.append(f"{cls.__name__}.{field.name}: no minimum")
            elif kind is int and bounds.le is None:
                unbounded.append(f"{cls.__name__}.{field.name}: no maximum")
    assert unbounded == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_that_is_not_finite_is_refused(value: str) -> None:
    # NaN passes every comparison: without the finiteness check it would pass any range.
    for name in ("HEARTBEAT_SECONDS", "TRITON_TIMEOUT_SECONDS"):
        with pytest.raises(SettingsError, match=f"SWAPLINE_WORKER_{name}={value} must be a finite number"):
            load_settings(WorkerSettings, "SWAPLINE_WORKER_", {**WORKER_TARGETS, f"SWAPLINE_WORKER_{name}": value})


def test_every_enumerated_setting_refuses_a_value_outside_its_choices_when_built() -> None:
    checked = []
    for cls in settings_classes():
        for name, kind in typing.get_type_hints(cls).items():
            if literal_choices(kind):
                checked.append(name)
                # Built in code (a test, the embedded stack), not only read from the environment.
                with pytest.raises(SettingsError, match=f"{name}='not-a-choice' is not one of"):
                    with_required_fields(cls, **{name: "not-a-choice"})
    assert {"transport_security", "backend", "gpu_trend_source", "device", "frame_format", "cascade"} <= set(checked)

"""Reads a frozen settings dataclass from environment variables named PREFIX + FIELD in upper case.

Every numeric or string field may carry its allowed range (`ranged(...)`), and every enumerated field is a
Literal type; a settings class that derives from ValidatedSettings checks both when it is built, so a
service refuses to start on `BATCH_SIZE=0` (or a backend it does not know) whether the value came from the
environment, a test or the chart. No number is NaN or infinite: NaN passes every comparison, and a float
field's range is bounded by being finite where it names no maximum. Int fields name their maximum, since
the values end in C types, protobuf fields and BIGINT columns.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from services.common.errors import InvalidArgument

SettingsT = TypeVar("SettingsT")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingsError(InvalidArgument):
    """A variable is missing, does not parse or is out of range; the message names it."""

    def __init__(self, message: str, field_name: str = "") -> None:
        super().__init__(message)
        self.field_name = field_name


BOUNDS_KEY = "swapline_bounds"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The allowed range of a number (ge/gt/le) or the longest allowed string or tuple (max_length)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    max_length: int | None = None

    def problem(self, value: Any) -> str:
        """What is wrong with `value`, or "" when it is allowed."""
        if isinstance(value, bool) or value is None:
            return ""
        if isinstance(value, int | float):
            if not math.isfinite(value):
                return "must be a finite number"
            if self.ge is not None and value < self.ge:
                return f"must be at least {self.ge:g}"
            if self.gt is not None and value <= self.gt:
                return f"must be greater than {self.gt:g}"
            if self.le is not None and value > self.le:
                return f"must be at most {self.le:g}"
        if self.max_length is not None and isinstance(value, str | tuple) and len(value) > self.max_length:
            return f"must be at most {self.max_length} long"
        return ""


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    max_length: int | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its allowed range, checked by ValidatedSettings."""
    metadata = {BOUNDS_KEY: Bounds(ge=ge, gt=gt, le=le, max_length=max_length)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_ranges(settings: Any) -> None:
    """Raises SettingsError for the first field outside its range."""
    for field in dataclasses.fields(settings):
        bounds = field.metadata.get(BOUNDS_KEY)
        if bounds is None:
            continue
        value = getattr(settings, field.name)
        problem = bounds.problem(value)
        if problem:
            shown = value if not isinstance(value, str) else f"{value[:40]!r}"
            raise SettingsError(f"{field.name}={shown} {problem}", field.name)


def literal_choices(kind: Any) -> tuple[Any, ...]:
    """The values a Literal type (or an optional one) allows; () for any other type."""
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return tuple(choice for arg in typing.get_args(kind) for choice in literal_choices(arg))
    return ()


def _field_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    hints = typing.get_type_hints(cls)
    return {field.name: choices for field in dataclasses.fields(cls) if (choices := literal_choices(hints[field.name]))}


def check_choices(settings: Any) -> None:
    """Raises SettingsError for the first enumerated (Literal) field holding a value it does not allow."""
    for name, choices in _field_choices(type(settings)).items():
        value = getattr(settings, name)
        if value is not None and value not in choices:
            raise SettingsError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}", name)


class ValidatedSettings:
    """Mixin for frozen settings dataclasses: ranges and choices are checked as soon as an instance exists."""

    def __post_init__(self) -> None:
        check_ranges(self)
        check_choices(self)


def env_name(prefix: str, field_name: str) -> str:
    return f"{prefix}{field_name.upper()}"


def _convert(name: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        inner = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return None if raw == "" else _convert(name, raw, inner[0])
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_convert(name, part.strip(), item) for part in raw.split(",") if part.strip())
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if raw not in allowed:
            raise SettingsError(f"{name}={raw!r} is not one of {', '.join(map(str, allowed))}")
        return raw
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{name}={raw!r} is not a boolean")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if kind is Path:
        return Path(raw)
    return raw


def required_env_names(cls: type, prefix: str) -> list[str]:
    """The variables a deployment must set: fields without a default."""
    return [
        env_name(prefix, field.name)
        for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]


def all_env_names(cls: type, prefix: str) -> list[str]:
    return [env_name(prefix, field.name) for field in dataclasses.fields(cls)]


def load_settings(cls: type[SettingsT], prefix: str, environ: Mapping[str, str] | None = None) -> SettingsT:
    source = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = env_name(prefix, field.name)
        if name in source:
            values[field.name] = _convert(name, source[name], hints[field.name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{name} must be set", field.name)
    try:
        return cls(**values)
    except SettingsError as error:
        if not error.field_name:
            raise
        raise SettingsError(
            error.message.replace(error.field_name, env_name(prefix, error.field_name), 1), error.field_name
        ) from None

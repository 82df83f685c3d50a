"""Reads a frozen settings dataclass from environment variables named PREFIX + FIELD in upper case."""

from __future__ import annotations

import dataclasses
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
    """A variable is missing or does not parse; the message names it."""


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
            raise SettingsError(f"{name} must be set")
    return cls(**values)

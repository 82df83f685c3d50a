"""The command line every service shares: `python -m services.<name> [--check]`.

Settings come from the environment (SWAPLINE_<SERVICE>_*). With --check a service loads and validates
them and exits without serving: 0 when they are valid, 1 with the reason when not. That proves an install
(the image, the wheel in a fresh virtual environment) holds every module the service imports, and that a
pod's environment is one the service accepts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TypeVar

from services.common.settings_loader import SettingsError, load_settings

SettingsT = TypeVar("SettingsT")


def service_settings(service: str, cls: type[SettingsT], prefix: str, argv: Sequence[str] | None = None) -> SettingsT:
    """The service's settings from the environment; under --check, exits once they are loaded."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{service}",
        description=f"The swapline {service}; its settings are the {prefix}* environment variables.",
    )
    parser.add_argument("--check", action="store_true", help="load and validate the settings, then exit")
    if not parser.parse_args(argv).check:
        return load_settings(cls, prefix)
    try:
        load_settings(cls, prefix)
    except SettingsError as error:
        raise SystemExit(f"{service}: settings are not valid: {error.message}") from None
    print(f"{service}: settings are valid", flush=True)
    raise SystemExit(0)

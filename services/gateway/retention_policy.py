"""Retention limits, by tenant: how long ended jobs are kept and how much media a tenant may store.

media_retention.py applies them; they come from the gateway's settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.common.settings_loader import SettingsError
from services.common.tenant_context import TENANT_NAME

TENANT_LIMITS_FIELD = "retention_tenant_limits"


@dataclass(frozen=True)
class RetentionLimits:
    # Ended jobs are deleted this long after they ended; 0 keeps them.
    max_age_seconds: float
    # The tenant's stored media may reach this many bytes; 0: no limit.
    max_bytes: int


@dataclass(frozen=True)
class RetentionPolicy:
    default: RetentionLimits
    # Tenants whose limits are not the default ones.
    tenants: Mapping[str, RetentionLimits]
    interrupted_seconds: float
    sweep_interval_seconds: float

    def limits_of(self, tenant: str) -> RetentionLimits:
        return self.tenants.get(tenant, self.default)


def tenant_limits(entries: Sequence[str]) -> dict[str, RetentionLimits]:
    """`tenant:max_age_seconds:max_bytes` entries by tenant; SettingsError names a bad one."""
    limits: dict[str, RetentionLimits] = {}
    for entry in entries:
        tenant, entry_limits = _parsed_entry(entry)
        if tenant in limits:
            raise _bad_entry(entry, "names a tenant a second time")
        limits[tenant] = entry_limits
    return limits


def _parsed_entry(entry: str) -> tuple[str, RetentionLimits]:
    parts = entry.split(":")
    if len(parts) != 3:
        raise _bad_entry(entry, "is not tenant:max_age_seconds:max_bytes")
    tenant, age_text, size_text = parts
    if not TENANT_NAME.fullmatch(tenant):
        raise _bad_entry(entry, "does not start with a valid tenant name")
    try:
        age, size = float(age_text), int(size_text)
    except ValueError:
        raise _bad_entry(entry, "needs a number of seconds and a whole number of bytes") from None
    # Written so that NaN fails too.
    if not (age >= 0 and size >= 0):
        raise _bad_entry(entry, "needs a max_age_seconds and a max_bytes of at least 0")
    return tenant, RetentionLimits(age, size)


def _bad_entry(entry: str, problem: str) -> SettingsError:
    return SettingsError(f"{TENANT_LIMITS_FIELD} entry {entry[:80]!r} {problem}", TENANT_LIMITS_FIELD)

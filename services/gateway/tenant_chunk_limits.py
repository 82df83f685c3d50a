"""Per-tenant limits on concurrently leased chunks: a tenant holding its limit gets no further lease, even with
workers idle, until one of its chunks ends (finishes, is queued again or fails, or its job ends).

The job store applies them when it chooses the chunk to lease (sql_job_store.py); they come from the gateway's
settings: a default for every tenant and overrides for named tenants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.common.settings_loader import SettingsError
from services.common.tenant_context import TENANT_NAME

TENANT_CHUNK_LIMITS_FIELD = "tenant_chunk_limits"
# The most chunks a limit may name: far past any cluster's workers, and small enough for any integer column.
MAX_LEASED_CHUNKS_CEILING = 1_000_000
# A limit of 0 leaves the tenant unlimited.
NO_LIMIT = 0


@dataclass(frozen=True)
class TenantChunkLimits:
    # Chunks a tenant may hold leased at once; NO_LIMIT: any number.
    default: int = NO_LIMIT
    # Tenants whose limit is not the default one (NO_LIMIT frees a tenant from a default limit).
    tenants: Mapping[str, int] = field(default_factory=dict)

    @property
    def has_limits(self) -> bool:
        """Whether some tenant has a limit: only then can a chunk ending make another chunk leasable."""
        return self.default != NO_LIMIT or any(limit != NO_LIMIT for limit in self.tenants.values())


NO_TENANT_CHUNK_LIMITS = TenantChunkLimits()


def tenant_chunk_limits(default: int, entries: Sequence[str]) -> TenantChunkLimits:
    """The default limit with `tenant:max_leased_chunks` entries by tenant; SettingsError names a bad entry."""
    tenants: dict[str, int] = {}
    for entry in entries:
        tenant, limit = _parsed_entry(entry)
        if tenant in tenants:
            raise _bad_entry(entry, "names a tenant a second time")
        tenants[tenant] = limit
    return TenantChunkLimits(default, tenants)


def _parsed_entry(entry: str) -> tuple[str, int]:
    parts = entry.split(":")
    if len(parts) != 2:
        raise _bad_entry(entry, "is not tenant:max_leased_chunks")
    tenant, limit_text = parts
    if not TENANT_NAME.fullmatch(tenant):
        raise _bad_entry(entry, "does not start with a valid tenant name")
    try:
        limit = int(limit_text)
    except ValueError:
        raise _bad_entry(entry, "needs a whole number of chunks") from None
    if not NO_LIMIT <= limit <= MAX_LEASED_CHUNKS_CEILING:
        raise _bad_entry(entry, f"needs a max_leased_chunks from 0 (no limit) to {MAX_LEASED_CHUNKS_CEILING}")
    return tenant, limit


def _bad_entry(entry: str, problem: str) -> SettingsError:
    return SettingsError(f"{TENANT_CHUNK_LIMITS_FIELD} entry {entry[:80]!r} {problem}", TENANT_CHUNK_LIMITS_FIELD)

"""Who is calling: set by the authentication interceptor for the duration of one call."""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

# Open mode, and stores migrated from before tenants existed, put every job here.
LOCAL_TENANT = "local"
# A tenant's name: a short word that is safe as a folder name and as the second field of a tokens line.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Caller:
    """A public caller acts for one tenant; an internal one (a swapline service) for the system."""

    tenant: str
    internal: bool = False


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("swapline_caller", default=None)
# Code that runs outside any call (tests, background tasks) acts for the local tenant.
_NO_CALL = Caller(LOCAL_TENANT)


def current_caller() -> Caller:
    return _CALLER.get() or _NO_CALL


def set_caller(caller: Caller) -> contextvars.Token[Caller | None]:
    return _CALLER.set(caller)


def reset_caller(token: contextvars.Token[Caller | None]) -> None:
    _CALLER.reset(token)

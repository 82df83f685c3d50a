"""Secret files: the tenants' bearer tokens, the internal service token and PEM files, as settings name them.

Token files are re-read when they change, so a rotated Kubernetes Secret applies without a restart: a
Secret volume is updated by swapping a symlink, which gives the file a new inode and modification time.
A file is looked at (stat) at most once per `recheck_seconds`; a changed file that no longer parses is
logged and the tokens read before stay in force, rather than locking every caller out.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from services.common.settings_loader import SettingsError
from services.common.tenant_context import TENANT_NAME

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RECHECK_SECONDS = 1.0
# Tokens travel as HTTP/2 header values: printable ASCII without spaces.
_TOKEN = re.compile(r"[\x21-\x7e]+")
# Tenants name jobs' owners in the store and in logs; a conservative alphabet keeps them safe in both.


class TokenFileError(ValueError):
    """A token file's content is malformed; the message names the line, never a token."""


@dataclass(frozen=True)
class TenantTokens:
    """The tenants' tokens, each compared in constant time so a caller cannot guess one byte by byte."""

    entries: tuple[tuple[bytes, str], ...] = ()

    def tenant_for(self, token: str) -> str | None:
        presented = token.encode("utf-8", errors="surrogateescape")
        found = None
        # Every entry is compared, so the time taken does not tell which one (or whether one) matched.
        for known, tenant in self.entries:
            if hmac.compare_digest(presented, known):
                found = tenant
        return found


def parse_tenant_tokens(text: str) -> TenantTokens:
    """Lines of `TOKEN TENANT`, whitespace separated; `#` starts a comment; blank lines are ignored."""
    entries: list[tuple[bytes, str]] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise TokenFileError(f"line {number}: expected `TOKEN TENANT`, found {len(fields)} fields")
        token, tenant = fields
        if not _TOKEN.fullmatch(token):
            raise TokenFileError(f"line {number}: a token must be printable ASCII")
        if not TENANT_NAME.fullmatch(tenant):
            raise TokenFileError(f"line {number}: a tenant is 1-64 letters, digits, '.', '_' or '-'")
        if token in first_line:
            raise TokenFileError(f"line {number}: the token of line {first_line[token]} again")
        first_line[token] = number
        entries.append((token.encode("ascii"), tenant))
    return TenantTokens(tuple(entries))


def parse_internal_token(text: str) -> str:
    """One token on one line (a trailing newline is fine)."""
    token = text.strip()
    if not token:
        raise TokenFileError("the file is empty")
    if not _TOKEN.fullmatch(token):
        raise TokenFileError("the token must be one line of printable ASCII without spaces")
    return token


def matches_token(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8", errors="surrogateescape"), expected.encode("ascii"))


_Signature = tuple[int, int, int, int]


def _signature(path: Path) -> _Signature:
    status = os.stat(path)
    return status.st_mtime_ns, status.st_size, status.st_ino, status.st_dev


class WatchedFile(Generic[T]):
    """A file's parsed content, re-read when the file changes. Construction reads it (raises when it cannot)."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[str], T],
        recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._parse = parse
        self._recheck_seconds = recheck_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._signature = _signature(path)
        self._value = parse(path.read_text(encoding="utf-8"))
        self._checked_at = clock()

    @property
    def value(self) -> T:
        return self._value

    def refresh_due(self) -> bool:
        """True when the file should be looked at again (cheap: no I/O)."""
        return self._clock() - self._checked_at >= self._recheck_seconds

    def refresh(self) -> None:
        """Re-reads the file if it changed (file I/O: off the event loop)."""
        with self._lock:
            self._checked_at = self._clock()
            try:
                signature = _signature(self.path)
            except OSError as error:
                log.warning("%s cannot be read (%s); the tokens read before stay in force", self.path, error.strerror)
                return
            if signature == self._signature:
                return
            # Remembered before parsing, so a bad file is reported once, not at every recheck.
            self._signature = signature
            try:
                self._value = self._parse(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, TokenFileError) as error:
                log.error("%s changed but cannot be used (%s); the tokens read before stay in force", self.path, error)
                return
            log.info("%s changed; re-read", self.path)


def watch_token_file(
    path: Path | None,
    parse: Callable[[str], T],
    setting: str,
    needed_for: str,
    recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
) -> WatchedFile[T]:
    """The file a setting names, read now; a SettingsError naming the setting when it is unset or unusable."""
    if path is None:
        raise SettingsError(f"{setting} must be set {needed_for}", setting)
    try:
        return WatchedFile(path, parse, recheck_seconds)
    except OSError as error:
        raise SettingsError(f"{setting}: cannot read {path}: {error.strerror}", setting) from None
    except (UnicodeDecodeError, TokenFileError) as error:
        raise SettingsError(f"{setting}: {path}: {error}", setting) from None


def read_secret_file(path: Path | None, setting: str, needed_for: str) -> bytes:
    """A PEM file a setting names; a SettingsError naming the setting when it is unset or unreadable."""
    if path is None:
        raise SettingsError(f"{setting} must be set {needed_for}", setting)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise SettingsError(f"{setting}: cannot read {path}: {error.strerror}", setting) from None
    if not content.strip():
        raise SettingsError(f"{setting}: {path} is empty", setting)
    return content

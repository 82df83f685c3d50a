"""Resolves media URIs against a media root; nothing outside the root is ever opened.

A URI's length, characters and name lengths are checked before any path work: resolving a path walks
it component by component with a system call each, and the OS refuses NUL bytes and over-long names
with errors that would otherwise surface as internal failures. Messages quote a URI by its first
characters only and never show where the media root lies on the server.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.input_limits import DEFAULT_INPUT_LIMITS, InputLimits, check_text, excerpt

FILE_SCHEME = "file://"


def check_media_uri(uri: str, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> None:
    """INVALID_ARGUMENT for an empty or over-long URI, a control character or an over-long name in it."""
    if not uri:
        raise InvalidArgument("media URI is empty")
    check_text("media URI", uri, limits.max_uri_length)
    for name in uri.split("/"):
        name_bytes = len(name.encode("utf-8", "surrogateescape"))
        if name_bytes > limits.max_filename_length:
            raise InvalidArgument(
                f"media URI {excerpt(uri)} has a name of {name_bytes} bytes; "
                f"the limit is {limits.max_filename_length} ({excerpt(name)})"
            )


def resolve_media_path(media_root: Path, uri: str, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> Path:
    """Turns a relative path, an absolute path or a file:// URI into a path inside media_root."""
    check_media_uri(uri, limits)
    raw = uri[len(FILE_SCHEME) :] if uri.startswith(FILE_SCHEME) else uri
    if "://" in raw:
        raise InvalidArgument(f"unsupported media URI scheme in {excerpt(uri)}; use a path under the media root")
    root = media_root.resolve()
    candidate = Path(raw)
    try:
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except RuntimeError:
        # pathlib's answer to a symbolic link loop.
        raise InvalidArgument(f"media URI {excerpt(uri)} runs into a symbolic link loop") from None
    if path != root and root not in path.parents:
        raise PermissionDenied(f"media URI {excerpt(uri)} is outside the media root")
    return path


def existing_media_path(media_root: Path, uri: str, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> Path:
    path = resolve_media_path(media_root, uri, limits)
    if not path.exists():
        raise NotFound(f"media file {excerpt(uri)} does not exist")
    if not path.is_file():
        raise InvalidArgument(f"media URI {excerpt(uri)} is not a regular file")
    return path


def writable_media_path(media_root: Path, uri: str, limits: InputLimits = DEFAULT_INPUT_LIMITS) -> Path:
    path = resolve_media_path(media_root, uri, limits)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def relative_uri(media_root: Path, path: Path) -> str:
    return str(path.resolve().relative_to(media_root.resolve()))


# Linux allows 255 bytes a name; the temporary name adds a dot, 16 hex digits and ".part" to this much.
TEMPORARY_STEM_BYTES = 200


def temporary_path(path: Path) -> Path:
    """A hidden name beside `path`, unique to one writer, that nobody takes for the finished file."""
    # Cut in bytes, as file systems count them, so a long multi-byte name still leaves room for the suffix.
    stem = os.fsencode(path.name)[:TEMPORARY_STEM_BYTES].decode("utf-8", "ignore")
    return path.with_name(f".{stem}.{secrets.token_hex(8)}.part")


def write_file(path: Path, data: bytes | memoryview | str, mode: int | None = None) -> Path:
    """Writes `data` under a temporary name beside `path` and renames it to `path`: readers see the old
    file or the whole new one. `mode` sets the permissions before the rename."""
    partial = temporary_path(path)
    try:
        if isinstance(data, str):
            partial.write_text(data)
        else:
            partial.write_bytes(data)
        if mode is not None:
            partial.chmod(mode)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path

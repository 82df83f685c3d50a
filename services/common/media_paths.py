"""Resolves media URIs against a media root; nothing outside the root is ever opened."""

from __future__ import annotations

from pathlib import Path

from services.common.errors import InvalidArgument, NotFound, PermissionDenied

FILE_SCHEME = "file://"


def resolve_media_path(media_root: Path, uri: str) -> Path:
    """Turns a relative path, an absolute path or a file:// URI into a path inside media_root."""
    if not uri:
        raise InvalidArgument("media URI is empty")
    raw = uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri
    if "://" in raw:
        raise InvalidArgument(f"unsupported media URI scheme in {uri!r}; use a path under the media root")
    root = media_root.resolve()
    candidate = Path(raw)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path != root and root not in path.parents:
        raise PermissionDenied(f"media URI {uri!r} is outside the media root")
    return path


def existing_media_path(media_root: Path, uri: str) -> Path:
    path = resolve_media_path(media_root, uri)
    if not path.exists():
        raise NotFound(f"media file {uri!r} does not exist")
    if not path.is_file():
        raise InvalidArgument(f"media URI {uri!r} is not a regular file")
    return path


def writable_media_path(media_root: Path, uri: str) -> Path:
    path = resolve_media_path(media_root, uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def relative_uri(media_root: Path, path: Path) -> str:
    return str(path.resolve().relative_to(media_root.resolve()))

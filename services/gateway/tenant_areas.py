"""Where each tenant's media lives under the media root, and which targets a tenant may name.

A tenant's uploads and the targets it names live in `tenants/<tenant>/`, and its target_uri is read
relative to that folder, so no tenant can name another's upload. The local tenant (open mode, and every
job from before tenants existed) keeps the media root itself, as before, minus the gateway's own areas
and the other tenants' folders.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.input_limits import excerpt
from services.common.media_paths import FILE_SCHEME
from services.common.tenant_context import LOCAL_TENANT, TENANT_NAME

TENANTS_FOLDER = "tenants"
UPLOADS_FOLDER = "uploads"
# Chunk segments and job images, in a folder per job.
WORK_FOLDER = "work"
# Outputs, reports and GPU trends, in a folder per job.
OUTPUTS_FOLDER = "outputs"
# Top-level names of the media root a local target_uri may not reach: the work and outputs folders, the
# tenants' folders, and the default SQLite job store with its journals.
GATEWAY_FOLDERS = frozenset({WORK_FOLDER, OUTPUTS_FOLDER, TENANTS_FOLDER})
GATEWAY_FILE_PREFIX = "swapline.db"
# The token file's alphabet; never "." or "..", which would name a folder above.


def checked_tenant(tenant: str) -> str:
    """The tenant name, or PERMISSION_DENIED: a name outside the alphabet never reaches a path or a query."""
    if not TENANT_NAME.fullmatch(tenant):
        raise PermissionDenied(f"tenant {excerpt(tenant)} is not a valid tenant name")
    return tenant


def tenant_area(tenant: str) -> str:
    """The tenant's folder relative to the media root; "" (the root) for the local tenant."""
    return "" if tenant == LOCAL_TENANT else f"{TENANTS_FOLDER}/{checked_tenant(tenant)}"


def in_tenant_area(tenant: str, relative_uri: str) -> str:
    area = tenant_area(tenant)
    return f"{area}/{relative_uri}" if area else relative_uri


def tenant_view(tenant: str, uri: str) -> str:
    """A media-root-relative URI as the tenant names it: relative to its own area."""
    prefix = f"{tenant_area(tenant)}/"
    return uri[len(prefix) :] if prefix != "/" and uri.startswith(prefix) else uri


def resolve_target(media_root: Path, tenant: str, target_uri: str) -> str:
    """The media-root-relative URI of the regular file the tenant's target_uri names.

    Symbolic links are followed before the checks, so a link cannot lead out of the area. Touches the
    file system: call it off the event loop, and only with a target_uri whose length was checked.
    """
    raw = target_uri[len(FILE_SCHEME) :] if target_uri.startswith(FILE_SCHEME) else target_uri
    if "://" in raw:
        raise InvalidArgument(f"target_uri {excerpt(target_uri)} has an unsupported scheme; name a media file")
    local = tenant == LOCAL_TENANT
    if PurePosixPath(raw).is_absolute() and not local:
        raise PermissionDenied(
            f"target_uri {excerpt(target_uri)} is outside your media area: name it relative to the area"
        )
    root = media_root.resolve()
    area = root / tenant_area(tenant) if not local else root
    try:
        path = (area / raw).resolve()
    except (OSError, RuntimeError, ValueError):
        # A symbolic link loop (RuntimeError), or a name the OS refuses.
        raise InvalidArgument(f"target_uri {excerpt(target_uri)} cannot be resolved to a media file") from None
    if path != area and area not in path.parents:
        where = "the media root" if local else "your media area"
        raise PermissionDenied(f"target_uri {excerpt(target_uri)} is outside {where}")
    relative = path.relative_to(area)
    if local and relative.parts:
        top = relative.parts[0]
        if top in GATEWAY_FOLDERS or top.startswith(GATEWAY_FILE_PREFIX):
            raise PermissionDenied(
                f"target_uri {excerpt(target_uri)} names the gateway's own files; name an upload or a media file"
            )
    if not path.exists():
        raise NotFound(f"target {excerpt(target_uri)} does not exist")
    if not path.is_file():
        raise InvalidArgument(f"target {excerpt(target_uri)} is not a regular file")
    return in_tenant_area(tenant, relative.as_posix())

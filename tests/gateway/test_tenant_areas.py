from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.gateway.tenant_areas import checked_tenant, in_tenant_area, resolve_target, tenant_view


@pytest.fixture
def media(tmp_path: Path) -> Path:
    for relative in ("clip.mp4", "uploads/j1/clip.mp4", "tenants/acme/uploads/j2/clip.mp4", "tenants/acme/own.mp4"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"video")
    (tmp_path / "tenants/acme/folder").mkdir()
    return tmp_path


def test_the_local_tenant_names_targets_in_the_media_root(media: Path) -> None:
    assert resolve_target(media, "local", "clip.mp4") == "clip.mp4"
    assert resolve_target(media, "local", "./uploads/j1/../j1/clip.mp4") == "uploads/j1/clip.mp4"
    assert resolve_target(media, "local", f"file://{media}/clip.mp4") == "clip.mp4"


def test_a_tenant_names_targets_in_its_own_area(media: Path) -> None:
    assert resolve_target(media, "acme", "own.mp4") == "tenants/acme/own.mp4"
    assert resolve_target(media, "acme", "uploads/j2/clip.mp4") == "tenants/acme/uploads/j2/clip.mp4"
    assert tenant_view("acme", "tenants/acme/uploads/j2/clip.mp4") == "uploads/j2/clip.mp4"
    assert tenant_view("local", "uploads/j1/clip.mp4") == "uploads/j1/clip.mp4"
    assert in_tenant_area("local", "uploads/x") == "uploads/x" and in_tenant_area("acme", "x") == "tenants/acme/x"


@pytest.mark.parametrize(
    ("tenant", "target_uri", "error", "words"),
    [
        ("acme", "../../clip.mp4", PermissionDenied, "outside your media area"),
        ("globex", "../acme/own.mp4", PermissionDenied, "outside your media area"),
        ("acme", "/etc/passwd", PermissionDenied, "outside your media area"),
        ("local", "../outside.mp4", PermissionDenied, "outside the media root"),
        ("local", "tenants/acme/own.mp4", PermissionDenied, "the gateway's own files"),
        ("local", "work/j1/source-image", PermissionDenied, "the gateway's own files"),
        ("local", "outputs/j1/output.mp4", PermissionDenied, "the gateway's own files"),
        ("local", "swapline.db-wal", PermissionDenied, "the gateway's own files"),
        ("globex", "tenants/acme/own.mp4", NotFound, "does not exist"),
        ("acme", "folder", InvalidArgument, "not a regular file"),
        ("acme", "s3://bucket/clip.mp4", InvalidArgument, "unsupported scheme"),
    ],
)
def test_targets_outside_the_tenants_area_are_refused(
    media: Path, tenant: str, target_uri: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words) as refused:
        resolve_target(media, tenant, target_uri)
    assert str(media) not in str(refused.value)


def test_a_symbolic_link_cannot_lead_out_of_the_area(media: Path) -> None:
    (media / "tenants/globex").mkdir()
    (media / "tenants/globex/link.mp4").symlink_to(media / "tenants/acme/own.mp4")
    (media / "link.mp4").symlink_to(media / "tenants/acme/own.mp4")
    with pytest.raises(PermissionDenied, match="outside your media area"):
        resolve_target(media, "globex", "link.mp4")
    with pytest.raises(PermissionDenied, match="the gateway's own files"):
        resolve_target(media, "local", "link.mp4")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "-" * 65, "ünï", ".hidden"])
def test_tenant_names_outside_the_alphabet_are_refused(name: str) -> None:
    with pytest.raises(PermissionDenied):
        checked_tenant(name)


def test_tenant_names_in_the_alphabet_pass() -> None:
    assert checked_tenant("acme-01.eu_west") == "acme-01.eu_west"

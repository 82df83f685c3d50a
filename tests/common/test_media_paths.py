"""Media URIs: checked as text before any path work, resolved inside the root, reported without server paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound, PermissionDenied, SwaplineError
from services.common.input_limits import InputLimits
from services.common.media_paths import existing_media_path, resolve_media_path, writable_media_path, write_file


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "clip.mp4").write_bytes(b"video")
    return root


@pytest.fixture
def resolve_forbidden(media_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path.resolve fails the test at once (on a megabyte URI it would run for minutes); media_root exists first."""

    def forbidden(self: Path, strict: bool = False) -> Path:
        raise AssertionError("Path.resolve was called")

    monkeypatch.setattr(Path, "resolve", forbidden)


def test_relative_absolute_and_file_uris_resolve_inside_the_root(media_root: Path) -> None:
    clip = (media_root / "uploads" / "clip.mp4").resolve()
    assert existing_media_path(media_root, "uploads/clip.mp4") == clip
    assert existing_media_path(media_root, str(clip)) == clip
    assert existing_media_path(media_root, f"file://{clip}") == clip


@pytest.mark.usefixtures("resolve_forbidden")
def test_a_megabyte_uri_is_refused_before_any_path_work(media_root: Path) -> None:
    uri = "a/" * 500_000
    with pytest.raises(InvalidArgument) as raised:
        existing_media_path(media_root, uri)
    assert raised.value.message.startswith("the media URI is 1000000 characters long; the limit is 1024")
    assert len(raised.value.message) < 200


@pytest.mark.usefixtures("resolve_forbidden")
@pytest.mark.parametrize("uri", ["uploads/clip\x00.mp4", "uploads/clip.mp4\n", "\x1b[2Jclip.mp4"])
def test_control_characters_are_invalid_before_any_path_work(media_root: Path, uri: str) -> None:
    with pytest.raises(InvalidArgument, match="the media URI holds the control character"):
        existing_media_path(media_root, uri)


def test_a_name_past_255_bytes_is_invalid(media_root: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"has a name of 300 bytes; the limit is 255"):
        existing_media_path(media_root, f"uploads/{'n' * 296}.mp4")


def test_names_are_measured_in_bytes(media_root: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"has a name of 256 bytes"):
        writable_media_path(media_root, "uploads/" + "é" * 128)


def test_a_name_of_255_bytes_is_looked_up(media_root: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        existing_media_path(media_root, f"uploads/{'n' * 251}.mp4")


def test_the_uri_limit_is_configurable(media_root: Path) -> None:
    limits = InputLimits(max_uri_length=10)
    with pytest.raises(InvalidArgument, match="the media URI is 16 characters long; the limit is 10"):
        existing_media_path(media_root, "uploads/clip.mp4", limits)


def test_a_path_outside_the_root_is_denied(media_root: Path) -> None:
    with pytest.raises(PermissionDenied, match="is outside the media root"):
        resolve_media_path(media_root, "../../etc/passwd")


def test_other_schemes_are_invalid(media_root: Path) -> None:
    with pytest.raises(InvalidArgument, match="unsupported media URI scheme"):
        resolve_media_path(media_root, "s3://bucket/clip.mp4")


def test_a_symbolic_link_loop_is_invalid(media_root: Path) -> None:
    (media_root / "loop").symlink_to(media_root / "loop")
    with pytest.raises(InvalidArgument, match="symbolic link loop"):
        existing_media_path(media_root, "loop/clip.mp4")


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("uploads/missing.mp4", NotFound),
        ("uploads", InvalidArgument),
        ("../outside.mp4", PermissionDenied),
        ("uploads/" + "x" * 300, InvalidArgument),
        ("uploads/\x00", InvalidArgument),
        ("x" * 5000, InvalidArgument),
    ],
)
def test_messages_never_show_the_server_path_or_a_long_uri_whole(
    media_root: Path, uri: str, error: type[SwaplineError]
) -> None:
    with pytest.raises(error) as raised:
        existing_media_path(media_root, uri)
    assert str(media_root.parent) not in raised.value.message
    assert len(raised.value.message) < 200


def test_write_file_replaces_the_whole_file_and_leaves_no_temporary_name(tmp_path: Path) -> None:
    target = tmp_path / "figures.json"
    target.write_text("old")
    assert write_file(target, "new") == target and target.read_text() == "new"
    assert write_file(tmp_path / "tool", b"\x7fELF", mode=0o755).stat().st_mode & 0o777 == 0o755
    assert sorted(path.name for path in tmp_path.iterdir()) == ["figures.json", "tool"]

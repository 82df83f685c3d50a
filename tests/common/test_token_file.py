from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.settings_loader import SettingsError
from services.common.token_file import (
    TokenFileError,
    WatchedFile,
    parse_internal_token,
    parse_tenant_tokens,
    read_secret_file,
    watch_token_file,
)

TOKENS = """\
# rotated 2026-12-01
alice-token-0123456789   alice

bob-token-0123456789\tbob   # the second tenant
"""


def test_tenant_tokens_map_each_token_to_its_tenant() -> None:
    tokens = parse_tenant_tokens(TOKENS)
    assert tokens.tenant_for("alice-token-0123456789") == "alice"
    assert tokens.tenant_for("bob-token-0123456789") == "bob"


@pytest.mark.parametrize(
    "presented", ["", "alice-token-012345678", "alice-token-01234567890", "ALICE-TOKEN-0123456789", "alice", "é"]
)
def test_anything_but_a_whole_token_has_no_tenant(presented: str) -> None:
    assert parse_tenant_tokens(TOKENS).tenant_for(presented) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("secret-token-value alice extra\n", "line 1: expected `TOKEN TENANT`, found 3 fields"),
        ("# header\nsecret-token-value\n", "line 2: expected `TOKEN TENANT`, found 1 fields"),
        ("secret-token-value ../alice\n", "line 1: a tenant is"),
        ("secret-token-value alice\nsecret-token-value bob\n", "line 2: the token of line 1 again"),
        ("secret-tokén-value alice\n", "line 1: a token must be printable ASCII"),
    ],
)
def test_a_malformed_tokens_file_names_the_line_and_never_the_token(text: str, problem: str) -> None:
    with pytest.raises(TokenFileError) as raised:
        parse_tenant_tokens(text)
    assert str(raised.value).startswith(problem)
    assert "secret" not in str(raised.value)


def test_the_internal_token_is_the_one_line_without_its_newline() -> None:
    assert parse_internal_token("  internal-token-42\n") == "internal-token-42"


@pytest.mark.parametrize("text", ["", "\n  \n", "two words\n"])
def test_an_empty_or_spaced_internal_token_is_refused(text: str) -> None:
    with pytest.raises(TokenFileError):
        parse_internal_token(text)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_changed_file_is_read_again_once_the_recheck_interval_passed(tmp_path: Path) -> None:
    path = tmp_path / "tenants"
    path.write_text("first-token alice\n")
    clock = _Clock()
    watched = WatchedFile(path, parse_tenant_tokens, recheck_seconds=5.0, clock=clock)
    path.write_text("second-token-longer alice\n")
    assert not watched.refresh_due()
    clock.now = 5.0
    assert watched.refresh_due()
    watched.refresh()
    assert watched.value.tenant_for("second-token-longer") == "alice"
    assert watched.value.tenant_for("first-token") is None
    assert not watched.refresh_due()


def test_a_rotated_kubernetes_secret_applies(tmp_path: Path) -> None:
    """A Secret volume holds `..data -> ..<timestamp>/` and `tenants -> ..data/tenants`; rotation swaps `..data`."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "..2026_12_01_a").mkdir()
    (volume / "..2026_12_01_a" / "tenants").write_text("old-token alice\n")
    (volume / "..data").symlink_to("..2026_12_01_a")
    (volume / "tenants").symlink_to("..data/tenants")
    watched = WatchedFile(volume / "tenants", parse_tenant_tokens, recheck_seconds=0.0)

    (volume / "..2026_12_01_b").mkdir()
    (volume / "..2026_12_01_b" / "tenants").write_text("new-token alice\n")
    (volume / "..data_tmp").symlink_to("..2026_12_01_b")
    os.replace(volume / "..data_tmp", volume / "..data")
    watched.refresh()

    assert watched.value.tenant_for("new-token") == "alice"
    assert watched.value.tenant_for("old-token") is None


def test_a_file_changed_into_garbage_keeps_the_tokens_read_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tenants"
    path.write_text("good-token alice\n")
    watched = WatchedFile(path, parse_tenant_tokens, recheck_seconds=0.0)
    path.write_text("good-token alice but broken\n")
    watched.refresh()
    assert watched.value.tenant_for("good-token") == "alice"
    assert "cannot be used" in caplog.text
    path.unlink()
    watched.refresh()
    assert watched.value.tenant_for("good-token") == "alice"


def test_an_unset_token_file_is_refused_by_its_setting_name() -> None:
    with pytest.raises(SettingsError, match="tenant_tokens_file must be set when") as raised:
        watch_token_file(None, parse_tenant_tokens, "tenant_tokens_file", "when public services are served")
    assert raised.value.field_name == "tenant_tokens_file"


def test_an_unreadable_or_malformed_token_file_is_refused_by_its_setting_name(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="internal_token_file: cannot read"):
        watch_token_file(tmp_path / "missing", parse_internal_token, "internal_token_file", "")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match=r"internal_token_file: .*the file is empty"):
        watch_token_file(empty, parse_internal_token, "internal_token_file", "")


def test_a_secret_file_must_exist_and_hold_something(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="tls_cert_file must be set when transport_security is tls"):
        read_secret_file(None, "tls_cert_file", "when transport_security is tls")
    with pytest.raises(SettingsError, match="tls_key_file: cannot read"):
        read_secret_file(tmp_path / "missing.key", "tls_key_file", "")
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(SettingsError, match=r"tls_ca_file: .* is empty"):
        read_secret_file(tmp_path / "empty.pem", "tls_ca_file", "")

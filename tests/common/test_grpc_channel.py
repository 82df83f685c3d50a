from __future__ import annotations

from pathlib import Path

import pytest

from services.common.grpc_channel import (
    CA_FILE_ENV,
    TOKEN_ENV,
    channel_options,
    channel_security,
    client_security_from_env,
)
from services.common.grpc_keepalive import KEEPALIVE
from services.common.server_settings import ServerSettings
from services.common.settings_loader import SettingsError
from tests.common.tls_files import Pki


def test_channels_use_the_shared_keepalive_policy() -> None:
    assert set(KEEPALIVE.client_options()) <= set(channel_options())


def test_a_service_reads_its_ca_certificate_and_internal_token(pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "internal-token"
    token_file.write_text("internal-token-b93e2d\n")
    settings = ServerSettings(
        transport_security="mtls",
        tls_cert_file=pki.client.cert_file,
        tls_key_file=pki.client.key_file,
        tls_ca_file=pki.ca_file,
        internal_token_file=token_file,
    )
    security = channel_security(settings)
    assert security.tls
    assert security.root_certificates == pki.ca_file.read_bytes()
    assert security.client_key_pair == (pki.client.key_file.read_bytes(), pki.client.cert_file.read_bytes())
    assert security.token is not None and security.token.value == "internal-token-b93e2d"


def test_plaintext_open_services_need_no_files() -> None:
    security = channel_security(ServerSettings(transport_security="plaintext", auth_mode="open"))
    assert (security.tls, security.token) == (False, None)


def test_token_mode_without_mtls_needs_the_internal_token() -> None:
    with pytest.raises(SettingsError, match="internal_token_file must be set") as raised:
        channel_security(ServerSettings(transport_security="plaintext"))
    assert raised.value.field_name == "internal_token_file"


def test_tls_needs_the_ca_to_verify_servers() -> None:
    with pytest.raises(SettingsError, match="tls_ca_file must be set"):
        channel_security(ServerSettings(auth_mode="open"))


def test_command_line_clients_read_the_token_and_ca_from_the_environment(pki: Pki) -> None:
    security = client_security_from_env({TOKEN_ENV: " alice-token-4f1c9a\n", CA_FILE_ENV: str(pki.ca_file)})
    assert security.tls and security.root_certificates == pki.ca_file.read_bytes()
    assert security.token is not None and security.token.value == "alice-token-4f1c9a"
    plain = client_security_from_env({})
    assert (plain.tls, plain.token) == (False, None)


def test_a_client_tries_a_server_that_is_down_again_within_two_seconds() -> None:
    options = dict(channel_options())
    assert (options["grpc.initial_reconnect_backoff_ms"], options["grpc.max_reconnect_backoff_ms"]) == (500, 2000)

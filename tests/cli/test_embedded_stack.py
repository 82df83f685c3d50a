from __future__ import annotations

import dataclasses
from pathlib import Path

from services.cli.embedded_stack import FRAME_SERVICES, frame_service_sockets, replica_name, security_env
from services.cli.stack_credentials import generate_credentials
from services.common.server_settings import ServerSettings


def test_without_a_socket_directory_the_frame_services_are_reached_over_tcp() -> None:
    assert frame_service_sockets(None) == {name: ({}, "") for name in FRAME_SERVICES}


def test_each_frame_service_listens_on_its_own_socket_and_is_reached_there() -> None:
    sockets = frame_service_sockets(Path("/tmp/swapline-x"))
    assert sockets["decoder"][0] == {"SWAPLINE_DECODER_UNIX_SOCKET": "/tmp/swapline-x/decoder.sock"}
    assert sockets["decoder"][1] == "unix:/tmp/swapline-x/decoder.sock"
    assert sockets["encoder"][1] == "unix:/tmp/swapline-x/encoder.sock"
    assert len({target for _, target in sockets.values()}) == len(FRAME_SERVICES)


def test_replicas_get_their_own_sockets_under_the_names_the_supervisor_runs() -> None:
    sockets = frame_service_sockets(Path("/tmp/swapline-x"), replicas=3)
    assert set(sockets) == {f"{service}{suffix}" for service in FRAME_SERVICES for suffix in ("", "-2", "-3")}
    assert sockets["decoder-3"] == (
        {"SWAPLINE_DECODER_UNIX_SOCKET": "/tmp/swapline-x/decoder-3.sock"},
        "unix:/tmp/swapline-x/decoder-3.sock",
    )
    assert frame_service_sockets(None, replicas=2)["encoder-2"] == ({}, "")


def test_replica_names() -> None:
    assert [replica_name("decoder", replica) for replica in range(3)] == ["decoder", "decoder-2", "decoder-3"]


def test_without_credentials_every_service_runs_open_and_says_plaintext() -> None:
    assert security_env("SWAPLINE_DECODER_", None) == {
        "SWAPLINE_DECODER_TRANSPORT_SECURITY": "plaintext",
        "SWAPLINE_DECODER_AUTH_MODE": "open",
    }


def test_with_credentials_every_service_gets_tls_tokens_and_the_files(tmp_path: Path) -> None:
    credentials = generate_credentials(tmp_path, ["alice"])
    env = security_env("SWAPLINE_WORKER_", credentials)
    assert env["SWAPLINE_WORKER_TRANSPORT_SECURITY"] == "tls"
    assert env["SWAPLINE_WORKER_AUTH_MODE"] == "token"
    assert env["SWAPLINE_WORKER_TLS_CA_FILE"] == str(credentials.ca_file)
    assert env["SWAPLINE_WORKER_INTERNAL_TOKEN_FILE"] == str(credentials.internal_token_file)
    assert env["SWAPLINE_WORKER_TENANT_TOKENS_FILE"] == str(credentials.tenant_tokens_file)
    assert (
        security_env("SWAPLINE_WORKER_", credentials, mutual_tls=True)["SWAPLINE_WORKER_TRANSPORT_SECURITY"] == "mtls"
    )
    # Each variable names a field every service's settings have.
    fields = {field.name for field in dataclasses.fields(ServerSettings)}
    assert {name.removeprefix("SWAPLINE_WORKER_").lower() for name in env} <= fields

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.cli.stack_credentials import CREDENTIALS_DIRNAME, StackCredentials, generate_credentials
from services.common.errors import InvalidArgument
from services.common.token_file import parse_internal_token, parse_tenant_tokens


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> StackCredentials:
    return generate_credentials(tmp_path_factory.mktemp("work"), ["alice", "bob"])


def health_server(credentials: StackCredentials, require_client_certificate: bool) -> Iterator[int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server_credentials = grpc.ssl_server_credentials(
        [(credentials.key_file.read_bytes(), credentials.cert_file.read_bytes())],
        root_certificates=credentials.ca_file.read_bytes() if require_client_certificate else None,
        require_client_auth=require_client_certificate,
    )
    port = server.add_secure_port("127.0.0.1:0", server_credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@pytest.fixture
def tls_port(credentials: StackCredentials) -> Iterator[int]:
    yield from health_server(credentials, require_client_certificate=False)


@pytest.fixture
def mtls_port(credentials: StackCredentials) -> Iterator[int]:
    yield from health_server(credentials, require_client_certificate=True)


def check_health(target: str, channel_credentials: grpc.ChannelCredentials) -> None:
    with grpc.secure_channel(target, channel_credentials) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_only_the_owner_can_read_the_credentials(credentials: StackCredentials) -> None:
    assert credentials.directory.name == CREDENTIALS_DIRNAME
    assert stat.S_IMODE(credentials.directory.stat().st_mode) == 0o700
    files = sorted(path.name for path in credentials.directory.iterdir())
    # The CA's key is gone once the service certificate is signed: nothing else can be signed with it.
    assert files == ["ca.crt", "internal.token", "service.crt", "service.key", "tenants"]
    for path in credentials.directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_the_token_files_are_what_the_services_read(credentials: StackCredentials) -> None:
    tenants = parse_tenant_tokens(credentials.tenant_tokens_file.read_text())
    assert tenants.tenant_for(credentials.token("alice")) == "alice"
    assert tenants.tenant_for(credentials.token("bob")) == "bob"
    internal = parse_internal_token(credentials.internal_token_file.read_text())
    assert len({internal, credentials.token("alice"), credentials.token("bob")}) == 3
    assert len(internal) >= 40


def test_a_client_trusting_the_ca_reaches_the_service_by_ip_and_by_localhost(
    credentials: StackCredentials, tls_port: int
) -> None:
    roots = grpc.ssl_channel_credentials(credentials.ca_file.read_bytes())
    check_health(f"127.0.0.1:{tls_port}", roots)
    check_health(f"localhost:{tls_port}", roots)


def test_the_service_certificate_is_also_a_client_certificate(credentials: StackCredentials, mtls_port: int) -> None:
    as_client = grpc.ssl_channel_credentials(
        credentials.ca_file.read_bytes(), credentials.key_file.read_bytes(), credentials.cert_file.read_bytes()
    )
    check_health(f"127.0.0.1:{mtls_port}", as_client)
    without_certificate = grpc.ssl_channel_credentials(credentials.ca_file.read_bytes())
    with pytest.raises(grpc.RpcError) as refused:
        check_health(f"127.0.0.1:{mtls_port}", without_certificate)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_ca_is_refused(tmp_path: Path, tls_port: int) -> None:
    stranger = generate_credentials(tmp_path, ["alice"])
    with pytest.raises(grpc.RpcError) as refused:
        check_health(f"127.0.0.1:{tls_port}", grpc.ssl_channel_credentials(stranger.ca_file.read_bytes()))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_each_start_makes_new_tokens_in_place(tmp_path: Path) -> None:
    first = generate_credentials(tmp_path, ["alice"])
    second = generate_credentials(tmp_path, ["carol"])
    assert second.directory == first.directory
    assert list(second.tenant_tokens) == ["carol"]
    assert parse_tenant_tokens(second.tenant_tokens_file.read_text()).tenant_for(first.token("alice")) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == [CREDENTIALS_DIRNAME]


@pytest.mark.parametrize("name", ["", "two words", "-dash", "x" * 65, "tab\tname"])
def test_tenant_names_that_the_tokens_file_cannot_hold_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument):
        generate_credentials(tmp_path, [name])
    assert not (tmp_path / CREDENTIALS_DIRNAME).exists()


def test_repeated_tenants_get_one_token(tmp_path: Path) -> None:
    assert list(generate_credentials(tmp_path, ["alice", "bob", "alice"]).tenant_tokens) == ["alice", "bob"]

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
import ssl
import stat
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.grpc_channel import PLAINTEXT, ChannelSecurity, StaticToken, open_channel
from services.common.grpc_server import ServiceBinding, listening_lines, server_options, start_metrics, start_server
from services.common.server_settings import ServerSettings
from services.common.settings_loader import SettingsError
from services.common.tenant_context import Caller
from tests.common.caller_echo import SERVICE, echo_binding, unary_caller
from tests.common.tls_files import KeyPair, Pki

T = TypeVar("T")
INTERNAL_ECHO = "swapline.test.InternalEcho"
INTERNAL_TOKEN = "internal-token-b93e2d"
# What the embedded stack matches on a service's stdout to learn its port.
STACK_LISTENING = re.compile(r"listening on (?P<host>[^\s:]+):(?P<port>\d+)")


def plain_open(**overrides: Any) -> ServerSettings:
    return ServerSettings(**{"transport_security": "plaintext", "auth_mode": "open", "metrics_port": -1, **overrides})


def tls_settings(pki: Pki, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "transport_security": "tls",
        "auth_mode": "open",
        "metrics_port": -1,
        "tls_cert_file": pki.server.cert_file,
        "tls_key_file": pki.server.key_file,
        "tls_ca_file": pki.ca_file,
    }
    return ServerSettings(**{**values, **overrides})


def trusting(pki: Pki, client: KeyPair | None = None, token: str = "") -> ChannelSecurity:
    return ChannelSecurity(
        tls=True,
        root_certificates=pki.ca_file.read_bytes(),
        client_key_pair=(client.key_file.read_bytes(), client.cert_file.read_bytes()) if client else None,
        token=StaticToken(token) if token else None,
    )


def _serving(settings: ServerSettings, bindings: Sequence[ServiceBinding], body: Callable[[Any], Awaitable[T]]) -> T:
    async def run() -> T:
        running = await start_server(settings, bindings)
        try:
            return await body(running)
        finally:
            await running.stop(None)

    return asyncio.run(run())


async def _health(target: str, security: ChannelSecurity = PLAINTEXT) -> int:
    async with open_channel(target, security) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return int(response.status)


async def _failure(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code()


def test_connection_age_is_off_by_default() -> None:
    names = dict(server_options(ServerSettings()))
    assert "grpc.max_connection_age_ms" not in names
    assert names["grpc.max_receive_message_length"] == ServerSettings().max_message_bytes


def test_connection_age_and_its_grace_follow_the_settings() -> None:
    options = dict(server_options(ServerSettings(max_connection_age_seconds=300, drain_seconds=7.5)))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 7_500


def test_a_server_with_a_unix_socket_answers_on_it_and_on_tcp() -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="swapline-test-"))
    socket_path = socket_dir / "service.sock"

    async def check(running: Any) -> tuple[int, int, int]:
        mode = stat.S_IMODE(socket_path.stat().st_mode)
        return await _health(f"unix:{socket_path}"), await _health(f"127.0.0.1:{running.port}"), mode

    try:
        on_socket, on_tcp, mode = _serving(plain_open(unix_socket=str(socket_path)), [], check)
    finally:
        shutil.rmtree(socket_dir)
    assert (on_socket, on_tcp) == (health_pb2.HealthCheckResponse.SERVING,) * 2
    # Unix sockets carry no TLS: only the service's user may connect.
    assert mode == 0o600


def test_a_unix_socket_that_cannot_be_bound_is_named_in_the_error() -> None:
    missing = "/nonexistent-swapline-dir/service.sock"
    with pytest.raises(OSError, match=missing):
        _serving(plain_open(unix_socket=missing), [], lambda running: asyncio.sleep(0))


def test_public_and_internal_services_listen_on_separate_ports() -> None:
    bindings = [echo_binding("public"), echo_binding("internal", INTERNAL_ECHO)]

    async def probe(running: Any) -> dict[str, Any]:
        public, internal = f"127.0.0.1:{running.port}", f"127.0.0.1:{running.internal_port}"
        async with open_channel(public, PLAINTEXT) as on_public, open_channel(internal, PLAINTEXT) as on_internal:
            return {
                "ports differ": running.port != running.internal_port,
                "public on public": await unary_caller(on_public),
                "internal on internal": await unary_caller(on_internal, service=INTERNAL_ECHO),
                "internal on public": await _failure(unary_caller(on_public, service=INTERNAL_ECHO)),
                "public on internal": await _failure(unary_caller(on_internal)),
                "health": (await _health(public), await _health(internal)),
                "lines": listening_lines("gateway", "127.0.0.1", running),
                "public port": running.port,
                "internal port": running.internal_port,
            }

    seen = _serving(plain_open(), bindings, probe)
    assert seen["ports differ"]
    assert seen["public on public"] == Caller("local", internal=False)
    assert seen["internal on internal"] == Caller("local", internal=True)
    assert seen["internal on public"] == grpc.StatusCode.UNIMPLEMENTED
    assert seen["public on internal"] == grpc.StatusCode.UNIMPLEMENTED
    assert seen["health"] == (health_pb2.HealthCheckResponse.SERVING,) * 2
    public_line, internal_line = seen["lines"]
    first = STACK_LISTENING.search(public_line)
    assert first is not None and int(first["port"]) == seen["public port"]
    assert internal_line == f"gateway internal listening on 127.0.0.1:{seen['internal port']}"


def test_a_server_with_only_internal_services_serves_them_on_its_port() -> None:
    async def probe(running: Any) -> tuple[Caller, bool, list[str], int]:
        async with open_channel(f"127.0.0.1:{running.port}", PLAINTEXT) as channel:
            caller = await unary_caller(channel, service=INTERNAL_ECHO)
        same_port = running.internal_port == running.port
        return caller, same_port, listening_lines("decoder", "127.0.0.1", running), running.port

    caller, same_port, lines, port = _serving(plain_open(), [echo_binding("internal", INTERNAL_ECHO)], probe)
    assert caller == Caller("local", internal=True)
    assert same_port
    assert lines == [f"decoder listening on 127.0.0.1:{port}"]


def _reflected_services(running: Any) -> Awaitable[Any]:
    async def ask() -> Any:
        async with open_channel(f"127.0.0.1:{running.port}", PLAINTEXT) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            try:
                async for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
                    return sorted(service.name for service in response.list_services_response.service)
            except grpc.aio.AioRpcError as error:
                return error.code()
        return None

    return ask()


def test_reflection_is_off_unless_asked_for() -> None:
    assert _serving(plain_open(), [echo_binding("public")], _reflected_services) == grpc.StatusCode.UNIMPLEMENTED
    listed = _serving(plain_open(reflection=True), [echo_binding("public")], _reflected_services)
    assert SERVICE in listed


def test_plaintext_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _serving(plain_open(), [], lambda running: asyncio.sleep(0))
    assert any("PLAINTEXT" in record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


def test_tls_serves_clients_that_trust_the_ca_only(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def probe(running: Any) -> tuple[int, grpc.StatusCode, grpc.StatusCode]:
        target = f"127.0.0.1:{running.port}"
        strange_ca = ChannelSecurity(tls=True, root_certificates=pki.stranger.cert_file.read_bytes())
        return (
            await _health(target, trusting(pki)),
            await _failure(_health(target)),
            await _failure(_health(target, strange_ca)),
        )

    trusted, plaintext, untrusted = _serving(tls_settings(pki), [echo_binding("public")], probe)
    assert trusted == health_pb2.HealthCheckResponse.SERVING
    assert plaintext == grpc.StatusCode.UNAVAILABLE
    assert untrusted == grpc.StatusCode.UNAVAILABLE
    assert "PLAINTEXT" not in caplog.text


def test_tls_carries_the_token_as_call_credentials(pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "internal-token"
    token_file.write_text(INTERNAL_TOKEN)
    settings = tls_settings(pki, auth_mode="token", internal_token_file=token_file)

    async def probe(running: Any) -> tuple[Caller, grpc.StatusCode]:
        target = f"127.0.0.1:{running.port}"
        async with open_channel(target, trusting(pki, token=INTERNAL_TOKEN)) as with_token:
            caller = await unary_caller(with_token, service=INTERNAL_ECHO)
        async with open_channel(target, trusting(pki)) as without:
            refused = await _failure(unary_caller(without, service=INTERNAL_ECHO))
        return caller, refused

    assert _serving(settings, [echo_binding("internal", INTERNAL_ECHO)], probe) == (
        Caller("", internal=True),
        grpc.StatusCode.UNAUTHENTICATED,
    )


def test_mtls_internal_services_take_a_certificate_instead_of_the_token(pki: Pki, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants"
    tenants.write_text("alice-token-4f1c9a alice\n")
    settings = tls_settings(pki, transport_security="mtls", auth_mode="token", tenant_tokens_file=tenants)
    bindings = [echo_binding("public"), echo_binding("internal", INTERNAL_ECHO)]

    async def probe(running: Any) -> dict[str, Any]:
        internal = f"127.0.0.1:{running.internal_port}"
        async with open_channel(internal, trusting(pki, pki.client)) as certified:
            caller = await unary_caller(certified, service=INTERNAL_ECHO)
        async with open_channel(f"127.0.0.1:{running.port}", trusting(pki, token="alice-token-4f1c9a")) as public:
            tenant = await unary_caller(public)
        return {
            "certified": caller,
            "public needs no certificate": tenant,
            "no certificate": await _failure(_health(internal, trusting(pki))),
            "foreign certificate": await _failure(_health(internal, trusting(pki, pki.stranger))),
        }

    seen = _serving(settings, bindings, probe)
    assert seen["certified"] == Caller("", internal=True)
    assert seen["public needs no certificate"] == Caller("alice", internal=False)
    assert seen["no certificate"] == grpc.StatusCode.UNAVAILABLE
    assert seen["foreign certificate"] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"tls_cert_file": None}, "tls_cert_file"),
        ({"tls_key_file": Path("/nonexistent/tls.key")}, "tls_key_file"),
        ({"transport_security": "mtls", "tls_ca_file": None}, "tls_ca_file"),
    ],
)
def test_tls_without_its_files_refuses_to_start(pki: Pki, overrides: dict[str, Any], setting: str) -> None:
    with pytest.raises(SettingsError, match=setting) as raised:
        _serving(tls_settings(pki, **overrides), [], lambda running: asyncio.sleep(0))
    assert raised.value.field_name == setting


def test_a_key_that_does_not_match_the_certificate_refuses_to_start(pki: Pki) -> None:
    with pytest.raises(SettingsError, match="tls_cert_file and tls_key_file"):
        _serving(tls_settings(pki, tls_key_file=pki.client.key_file), [], lambda running: asyncio.sleep(0))


def test_token_mode_needs_the_files_its_services_check() -> None:
    with pytest.raises(SettingsError, match="internal_token_file must be set"):
        _serving(plain_open(auth_mode="token"), [echo_binding("internal")], lambda running: asyncio.sleep(0))


def test_metrics_are_served_over_tls_with_the_servers_certificate(pki: Pki) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = start_metrics(tls_settings(pki, metrics_port=port))
    try:
        trusting_ca = ssl.create_default_context(cafile=str(pki.ca_file))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=trusting_ca, timeout=10) as page:
            assert b"python_info" in page.read()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        metrics.shutdown()
        metrics.server_close()

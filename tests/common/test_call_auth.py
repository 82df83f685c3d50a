from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.call_auth import AUDIENCES, bearer_token
from services.common.grpc_channel import PLAINTEXT, ChannelSecurity, StaticToken, bearer_metadata, open_channel
from services.common.grpc_server import ServiceBinding, start_server
from services.common.server_settings import ServerSettings
from services.common.tenant_context import LOCAL_TENANT, Caller
from tests.common.caller_echo import echo_binding, stream_callers, unary_caller

ALICE_TOKEN = "alice-token-4f1c9a"
BOB_TOKEN = "bob-token-77d0e3"
INTERNAL_TOKEN = "internal-token-b93e2d"

T = TypeVar("T")


@pytest.fixture
def token_files(tmp_path: Path) -> tuple[Path, Path]:
    tenants = tmp_path / "tenants"
    tenants.write_text(f"{ALICE_TOKEN} alice\n{BOB_TOKEN} bob\n")
    internal = tmp_path / "internal-token"
    internal.write_text(INTERNAL_TOKEN + "\n")
    return tenants, internal


def _settings(token_files: tuple[Path, Path], **overrides: Any) -> ServerSettings:
    tenants, internal = token_files
    values: dict[str, Any] = {
        "transport_security": "plaintext",
        "metrics_port": -1,
        "tenant_tokens_file": tenants,
        "internal_token_file": internal,
    }
    return ServerSettings(**{**values, **overrides})


def _run_against(
    settings: ServerSettings,
    bindings: Sequence[ServiceBinding],
    body: Callable[[grpc.aio.Channel], Awaitable[T]],
    security: ChannelSecurity = PLAINTEXT,
) -> T:
    async def run() -> T:
        running = await start_server(settings, bindings)
        try:
            async with open_channel(f"127.0.0.1:{running.port}", security) as channel:
                return await body(channel)
        finally:
            await running.stop(None)

    return asyncio.run(run())


def _code_and_details(settings: ServerSettings, binding: ServiceBinding, metadata: Any) -> tuple[Any, str]:
    async def call(channel: grpc.aio.Channel) -> tuple[Any, str]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unary_caller(channel, metadata)
        return raised.value.code(), raised.value.details() or ""

    return _run_against(settings, [binding], call)


def test_a_tenant_token_on_a_public_service_acts_for_its_tenant(token_files: tuple[Path, Path]) -> None:
    async def callers(channel: grpc.aio.Channel) -> tuple[Caller, Caller, list[Caller]]:
        return (
            await unary_caller(channel, bearer_metadata(ALICE_TOKEN)),
            await unary_caller(channel, bearer_metadata(BOB_TOKEN)),
            await stream_callers(channel, bearer_metadata(BOB_TOKEN)),
        )

    alice, bob, streamed = _run_against(_settings(token_files), [echo_binding("public")], callers)
    assert alice == Caller("alice", internal=False)
    assert bob == Caller("bob", internal=False)
    assert streamed == [Caller("bob", internal=False)] * 2


def test_the_internal_token_on_a_public_service_acts_for_the_system(token_files: tuple[Path, Path]) -> None:
    caller = _run_against(
        _settings(token_files), [echo_binding("public")], lambda c: unary_caller(c, bearer_metadata(INTERNAL_TOKEN))
    )
    assert caller == Caller("", internal=True)


@pytest.mark.parametrize(
    ("metadata", "details"),
    [
        (None, "missing bearer token"),
        ((("authorization", f"Basic {ALICE_TOKEN}"),), "missing bearer token"),
        ((("authorization", "Bearer "),), "missing bearer token"),
        (bearer_metadata("wrong-token-4f1c9a"), "invalid token"),
        (bearer_metadata(ALICE_TOKEN + "x"), "invalid token"),
    ],
)
def test_a_public_call_without_a_known_token_is_unauthenticated(
    token_files: tuple[Path, Path], metadata: Any, details: str
) -> None:
    code, message = _code_and_details(_settings(token_files), echo_binding("public"), metadata)
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, details)


def test_a_stream_without_a_token_is_unauthenticated(token_files: tuple[Path, Path]) -> None:
    async def call(channel: grpc.aio.Channel) -> Any:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream_callers(channel, bearer_metadata("wrong-token-4f1c9a"))
        return raised.value.code()

    assert _run_against(_settings(token_files), [echo_binding("public")], call) == grpc.StatusCode.UNAUTHENTICATED


def test_an_internal_service_takes_the_internal_token(token_files: tuple[Path, Path]) -> None:
    async def callers(channel: grpc.aio.Channel) -> tuple[Caller, list[Caller]]:
        metadata = bearer_metadata(INTERNAL_TOKEN)
        return await unary_caller(channel, metadata), await stream_callers(channel, metadata)

    unary, streamed = _run_against(_settings(token_files), [echo_binding("internal")], callers)
    assert unary == Caller("", internal=True)
    assert streamed == [Caller("", internal=True)] * 2


@pytest.mark.parametrize("token", [ALICE_TOKEN, "wrong-token-4f1c9a"])
def test_an_internal_service_refuses_tenant_tokens(token_files: tuple[Path, Path], token: str) -> None:
    code, message = _code_and_details(_settings(token_files), echo_binding("internal"), bearer_metadata(token))
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    assert token not in message


def test_a_public_server_without_tenant_tokens_serves_and_refuses_every_tenant(
    token_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(token_files, tenant_tokens_file=None)
    code, message = _code_and_details(settings, echo_binding("public"), bearer_metadata(ALICE_TOKEN))
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, "invalid token")
    assert "no tenant_tokens_file" in caplog.text
    caller = _run_against(
        settings, [echo_binding("public")], lambda c: unary_caller(c, bearer_metadata(INTERNAL_TOKEN))
    )
    assert caller.internal


def test_an_internal_only_server_needs_no_tenant_tokens(token_files: tuple[Path, Path]) -> None:
    settings = _settings(token_files, tenant_tokens_file=None)
    caller = _run_against(
        settings, [echo_binding("internal")], lambda c: unary_caller(c, bearer_metadata(INTERNAL_TOKEN))
    )
    assert caller.internal


def test_open_mode_asks_nobody_and_says_so(token_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    settings = ServerSettings(transport_security="plaintext", auth_mode="open", metrics_port=-1)
    bindings = [echo_binding("public"), echo_binding("internal", "swapline.test.InternalEcho")]

    async def both() -> tuple[Caller, Caller]:
        running = await start_server(settings, bindings)
        try:
            async with (
                open_channel(f"127.0.0.1:{running.port}", PLAINTEXT) as public,
                open_channel(f"127.0.0.1:{running.internal_port}", PLAINTEXT) as internal,
            ):
                return await unary_caller(public), await unary_caller(internal, service="swapline.test.InternalEcho")
        finally:
            await running.stop(None)

    assert asyncio.run(both()) == (Caller(LOCAL_TENANT, internal=False), Caller(LOCAL_TENANT, internal=True))
    assert "OPEN MODE" in caplog.text


def test_health_checks_need_no_token(token_files: tuple[Path, Path]) -> None:
    async def check(channel: grpc.aio.Channel) -> int:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return int(response.status)

    for audience in AUDIENCES:
        status = _run_against(_settings(token_files), [echo_binding(audience)], check)
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_channel_with_a_token_carries_it_on_every_call_kind(token_files: tuple[Path, Path]) -> None:
    async def callers(channel: grpc.aio.Channel) -> tuple[Caller, list[Caller]]:
        return await unary_caller(channel), await stream_callers(channel)

    security = ChannelSecurity(token=StaticToken(INTERNAL_TOKEN))
    unary, streamed = _run_against(_settings(token_files), [echo_binding("internal")], callers, security)
    assert unary == Caller("", internal=True)
    assert streamed == [Caller("", internal=True)] * 2


def test_a_unix_socket_channel_carries_the_token(token_files: tuple[Path, Path], tmp_path: Path) -> None:
    socket_path = tmp_path / "echo.sock"
    settings = _settings(token_files, unix_socket=str(socket_path))

    async def over_the_socket() -> tuple[Caller, Any]:
        running = await start_server(settings, [echo_binding("internal")])
        try:
            async with open_channel(
                f"unix:{socket_path}", ChannelSecurity(token=StaticToken(INTERNAL_TOKEN))
            ) as carrying:
                caller = await unary_caller(carrying)
            async with open_channel(f"unix:{socket_path}", PLAINTEXT) as bare:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await unary_caller(bare)
            return caller, raised.value.code()
        finally:
            await running.stop(None)

    assert asyncio.run(over_the_socket()) == (Caller("", internal=True), grpc.StatusCode.UNAUTHENTICATED)


def test_a_rotated_tenant_tokens_file_applies_without_a_restart(token_files: tuple[Path, Path]) -> None:
    tenants, _ = token_files
    rotated = "alice-token-rotated-5b2e"

    async def rotate(channel: grpc.aio.Channel) -> tuple[Caller, Any]:
        assert (await unary_caller(channel, bearer_metadata(ALICE_TOKEN))).tenant == "alice"
        tenants.write_text(f"{rotated} alice\n")
        deadline = time.monotonic() + 10
        while True:
            try:
                await unary_caller(channel, bearer_metadata(ALICE_TOKEN))
            except grpc.aio.AioRpcError as error:
                old_code = error.code()
                break
            assert time.monotonic() < deadline, "the old token was still accepted 10 s after the rotation"
            await asyncio.sleep(0.1)
        return await unary_caller(channel, bearer_metadata(rotated)), old_code

    caller, old_code = _run_against(_settings(token_files), [echo_binding("public")], rotate)
    assert caller == Caller("alice", internal=False)
    assert old_code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("x-other", "1"), ("authorization", "bearer  abc ")), "abc"),
        ((("authorization", b"Bearer abc"),), "abc"),
        ((("authorization", "Token abc"),), None),
        ((), None),
        (None, None),
    ],
)
def test_the_bearer_token_is_read_from_the_authorization_metadata(metadata: Any, token: str | None) -> None:
    assert bearer_token(metadata) == token

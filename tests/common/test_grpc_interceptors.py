import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument, NotFound
from services.common.grpc_channel import PLAINTEXT, open_channel
from services.common.grpc_interceptors import status_of
from services.common.grpc_server import ServiceBinding, start_server
from services.common.server_settings import ServerSettings

HOLD_SERVICE = "swapline.test.Hold"


def test_domain_errors_keep_their_code() -> None:
    assert status_of(NotFound("job 'x' does not exist")) == (grpc.StatusCode.NOT_FOUND, "job 'x' does not exist")


def test_a_client_message_that_is_not_protobuf_is_the_clients_mistake() -> None:
    assert status_of(DecodeError("Error parsing message"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_anything_else_is_our_bug() -> None:
    assert status_of(RuntimeError("boom"))[0] == grpc.StatusCode.INTERNAL
    assert status_of(InvalidArgument("bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def _in_flight(method: str) -> float:
    return REGISTRY.get_sample_value("swapline_rpc_in_flight", {"method": method}) or 0.0


def test_calls_in_flight_are_gauged_while_they_run() -> None:
    release = asyncio.Event()

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"started"
        await release.wait()
        yield b"done"

    def register(servicer: Any, server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(hold, lambda data: data, lambda data: data)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HOLD_SERVICE, {"Hold": handler}),))

    async def run() -> tuple[float, float]:
        settings = ServerSettings(transport_security="plaintext", auth_mode="open", metrics_port=-1)
        running = await start_server(settings, [ServiceBinding(None, register, HOLD_SERVICE)])
        channel = open_channel(f"127.0.0.1:{running.port}", PLAINTEXT)
        try:
            call = channel.unary_stream(f"/{HOLD_SERVICE}/Hold", lambda data: data, lambda data: data)(b"")
            assert await call.read() == b"started"
            while_open = _in_flight("Hold")
            release.set()
            assert await call.read() == b"done"
            assert await call.code() == grpc.StatusCode.OK
            return while_open, _in_flight("Hold")
        finally:
            await channel.close()
            await running.stop(None)

    before = _in_flight("Hold")
    while_open, after = asyncio.run(run())
    assert (while_open - before, after - before) == (1.0, 0.0)

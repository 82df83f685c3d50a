"""A test service that answers with the Caller the authentication interceptor set, on a unary and a stream method."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common.call_auth import Audience
from services.common.grpc_server import ServiceBinding
from services.common.tenant_context import Caller, current_caller

SERVICE = "swapline.test.CallerEcho"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"


def _identity(data: bytes) -> bytes:
    return data


def encode_caller(caller: Caller) -> bytes:
    return f"{caller.tenant}|{'internal' if caller.internal else 'public'}".encode()


def decode_caller(data: bytes) -> Caller:
    tenant, kind = data.decode().split("|")
    return Caller(tenant, internal=kind == "internal")


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return encode_caller(current_caller())


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield encode_caller(current_caller())


def _register(servicer: Any, server: grpc.aio.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=_identity, response_serializer=_identity
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def echo_binding(audience: Audience, name: str = SERVICE) -> ServiceBinding:
    """`name` lets one test serve a public and an internal echo under two service names."""
    if name == SERVICE:
        return ServiceBinding(None, _register, SERVICE, audience=audience)

    def register(servicer: Any, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=_identity, response_serializer=_identity
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"Unary": handler}),))

    return ServiceBinding(None, register, name, audience=audience)


async def unary_caller(channel: grpc.aio.Channel, metadata: Any = None, service: str = SERVICE) -> Caller:
    call = channel.unary_unary(f"/{service}/Unary", request_serializer=_identity, response_deserializer=_identity)
    return decode_caller(await call(b"", timeout=10, metadata=metadata))


async def stream_callers(channel: grpc.aio.Channel, metadata: Any = None) -> list[Caller]:
    call = channel.unary_stream(STREAM, request_serializer=_identity, response_deserializer=_identity)
    return [decode_caller(data) async for data in call(b"", timeout=10, metadata=metadata)]

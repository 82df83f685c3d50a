"""The one place where errors become gRPC statuses, and where every call is counted and timed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram

from services.common.errors import SwaplineError, from_rpc_error

log = logging.getLogger(__name__)

RPC_HANDLED = Counter("swapline_rpc_handled_total", "RPCs completed, by method and status code.", ["method", "code"])
# What a service is doing right now: streams and requests open, by method.
RPC_IN_FLIGHT = Gauge("swapline_rpc_in_flight", "RPCs being served, by method.", ["method"])
RPC_SECONDS = Histogram(
    "swapline_rpc_seconds",
    "Server-side RPC latency in seconds, by method.",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, SwaplineError):
        return error.code, error.message
    if isinstance(error, grpc.RpcError):
        mapped = from_rpc_error(error)
        return mapped.code, mapped.message
    if isinstance(error, DecodeError):
        # A message of a client stream that is not the protobuf the method takes: the client's mistake.
        return grpc.StatusCode.INVALID_ARGUMENT, "a request message is not a valid protobuf message of its type"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


async def _abort(context: grpc.aio.ServicerContext, method: str, error: BaseException) -> None:
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=error)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    RPC_HANDLED.labels(method, code.name).inc()
    await context.abort(code, message)


UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def rewrapped(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Callable[[UnaryBehaviour], UnaryBehaviour],
    wrap_stream: Callable[[StreamBehaviour], StreamBehaviour],
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: calls answering one message, or streams of them."""
    if handler.unary_unary or handler.stream_unary:
        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(
            wrap_unary(handler.unary_unary or handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    make_stream = (
        grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    )
    return make_stream(
        wrap_stream(handler.unary_stream or handler.stream_stream),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors (and downstream RpcErrors) to statuses; counts, times and gauges every RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def wrap_unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                RPC_IN_FLIGHT.labels(method).inc()
                try:
                    response = await inner(request, context)
                except (SwaplineError, grpc.RpcError, Exception) as error:
                    if isinstance(error, grpc.aio.AbortError):
                        raise
                    await _abort(context, method, error)
                    raise
                finally:
                    RPC_IN_FLIGHT.labels(method).dec()
                    RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
                RPC_HANDLED.labels(method, "OK").inc()
                return response

            return unary_response

        def wrap_stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.perf_counter()
                RPC_IN_FLIGHT.labels(method).inc()
                try:
                    async for response in inner(request, context):
                        yield response
                except (SwaplineError, grpc.RpcError, Exception) as error:
                    if isinstance(error, grpc.aio.AbortError):
                        raise
                    await _abort(context, method, error)
                    raise
                finally:
                    RPC_IN_FLIGHT.labels(method).dec()
                    RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
                RPC_HANDLED.labels(method, "OK").inc()

            return stream_response

        return rewrapped(handler, wrap_unary, wrap_stream)

"""The one place where errors become gRPC statuses, and where every call is counted and timed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from services.common.errors import SwaplineError, from_rpc_error

log = logging.getLogger(__name__)

RPC_HANDLED = Counter("swapline_rpc_handled_total", "RPCs completed, by method and status code.", ["method", "code"])
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
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


async def _abort(context: grpc.aio.ServicerContext, method: str, error: BaseException) -> None:
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=error)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    RPC_HANDLED.labels(method, code.name).inc()
    await context.abort(code, message)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors (and downstream RpcErrors) to statuses; counts and times every RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    response = await inner(request, context)
                except (SwaplineError, grpc.RpcError, Exception) as error:
                    if isinstance(error, grpc.aio.AbortError):
                        raise
                    await _abort(context, method, error)
                    raise
                finally:
                    RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
                RPC_HANDLED.labels(method, "OK").inc()
                return response

            make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(
                unary_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for response in inner_stream(request, context):
                    yield response
            except (SwaplineError, grpc.RpcError, Exception) as error:
                if isinstance(error, grpc.aio.AbortError):
                    raise
                await _abort(context, method, error)
                raise
            finally:
                RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
            RPC_HANDLED.labels(method, "OK").inc()

        make_stream = (
            grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        )
        return make_stream(
            stream_response,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

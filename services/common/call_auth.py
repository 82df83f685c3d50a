"""Who may call: bearer tokens on public services, the internal token (or an mTLS certificate) on internal ones.

Public services (the JobService) take a tenant's token from the tenant tokens file, or the internal
service token, which acts for the system (the advisor reads every tenant's jobs with it).
Internal services (the chunk queue, the stage services, the advisor) take only the internal token, or
under mtls a client certificate the server verified. Health checks are never asked (kubelet probes carry nothing).
The caller is set in tenant_context for the duration of the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from grpc_health.v1 import health

from services.common.errors import Unauthenticated
from services.common.grpc_interceptors import StreamBehaviour, UnaryBehaviour, rewrapped
from services.common.server_settings import AuthMode
from services.common.tenant_context import LOCAL_TENANT, Caller, reset_caller, set_caller
from services.common.token_file import TenantTokens, WatchedFile, matches_token

# public: reached by users with a tenant token; internal: reached by swapline services only, on the internal port.
Audience = Literal["public", "internal"]
AUDIENCES: tuple[Audience, ...] = typing.get_args(Audience)

AUTHORIZATION = "authorization"
BEARER = "bearer"
_HEALTH_METHODS = f"/{health.SERVICE_NAME}/"
INTERNAL_CALLER = Caller(tenant="", internal=True)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == BEARER and token else None
    return None


async def _fresh(source: WatchedFile[Any] | None) -> None:
    if source is not None and source.refresh_due():
        await asyncio.to_thread(source.refresh)


@dataclass(frozen=True)
class CallAuthenticator:
    """Decides who a call on one listener comes from; raises Unauthenticated when nobody it trusts."""

    audience: Audience
    mode: AuthMode
    tenant_tokens: WatchedFile[TenantTokens] | None = None
    internal_token: WatchedFile[str] | None = None
    # The listener required and verified a client certificate (mtls on the internal port).
    trusts_client_certificates: bool = False

    async def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        if self.mode == "open":
            return Caller(LOCAL_TENANT, internal=self.audience == "internal")
        if self.trusts_client_certificates and context.peer_identities() is not None:
            return INTERNAL_CALLER
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise Unauthenticated("missing bearer token")
        await _fresh(self.internal_token)
        if self.internal_token is not None and matches_token(token, self.internal_token.value):
            return INTERNAL_CALLER
        if self.audience == "public" and self.tenant_tokens is not None:
            await _fresh(self.tenant_tokens)
            tenant = self.tenant_tokens.value.tenant_for(token)
            if tenant is not None:
                return Caller(tenant)
        raise Unauthenticated("invalid token")


class CallAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health checks, and sets its Caller while the handler runs.

    Placed after the ErrorMappingInterceptor, so Unauthenticated is answered like any domain error.
    """

    def __init__(self, authenticator: CallAuthenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_METHODS):
            return handler
        authenticate = self._authenticator.caller

        def wrap_unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = set_caller(await authenticate(context))
                try:
                    return await inner(request, context)
                finally:
                    reset_caller(token)

            return unary_response

        def wrap_stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                # Each call runs in its own task, so the caller set here is seen by this call's handler only.
                token = set_caller(await authenticate(context))
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    # A generator abandoned mid-stream is closed later by the loop in another context, where
                    # this token is foreign and there is nothing to reset.
                    with contextlib.suppress(ValueError):
                        reset_caller(token)

            return stream_response

        return rewrapped(handler, wrap_unary, wrap_stream)

"""Client channels: the servers' message limits, the shared keepalive policy, TLS, and a bearer token on every call.

Services call each other with the internal service token (or, under mtls, their own certificate);
command-line clients with a tenant's token. Under TLS the token travels as call credentials; on
plaintext and unix-socket channels, where gRPC refuses call credentials, an interceptor adds it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from services.common.call_auth import AUTHORIZATION
from services.common.grpc_keepalive import KEEPALIVE, KeepalivePolicy
from services.common.server_settings import DEFAULT_MAX_MESSAGE_BYTES, ServerSettings
from services.common.settings_loader import SettingsError
from services.common.token_file import parse_internal_token, read_secret_file, watch_token_file

# What command-line clients read: a tenant's token, and the CA that signed the gateway's certificate
# (set: TLS; unset: plaintext).
TOKEN_ENV = "SWAPLINE_TOKEN"
CA_FILE_ENV = "SWAPLINE_CA_FILE"
_UNIX_SCHEMES = ("unix:", "unix-abstract:")


class TokenSource(Protocol):
    """A bearer token that may change (a WatchedFile of the internal token is one)."""

    @property
    def value(self) -> str: ...

    def refresh_due(self) -> bool: ...

    def refresh(self) -> None: ...


@dataclass(frozen=True)
class StaticToken:
    value: str

    def refresh_due(self) -> bool:
        return False

    def refresh(self) -> None:
        return None


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client proves who it is and checks whom it talks to."""

    tls: bool = False
    # PEM of the CA that signed the servers' certificates; None with tls: the system's CAs.
    root_certificates: bytes | None = None
    # mtls: (private key, certificate chain) in PEM, shown to the server.
    client_key_pair: tuple[bytes, bytes] | None = None
    token: TokenSource | None = None


PLAINTEXT = ChannelSecurity()


def channel_security(settings: ServerSettings) -> ChannelSecurity:
    """A service's client side, from its own settings: the same transport security as its server, its CA,
    its certificate under mtls, and the internal token when a file names it. Reads the files now."""
    token = None
    if settings.internal_token_file is not None:
        token = watch_token_file(settings.internal_token_file, parse_internal_token, "internal_token_file", "")
    elif settings.auth_mode == "token" and settings.transport_security != "mtls":
        raise SettingsError(
            "internal_token_file must be set when auth_mode is token without mtls: calls to other services carry it",
            "internal_token_file",
        )
    if settings.transport_security == "plaintext":
        return ChannelSecurity(token=token)
    roots = read_secret_file(settings.tls_ca_file, "tls_ca_file", "to verify the services this one calls")
    key_pair = None
    if settings.transport_security == "mtls":
        needed_for = "when transport_security is mtls (the certificate shown to other services)"
        key_pair = (
            read_secret_file(settings.tls_key_file, "tls_key_file", needed_for),
            read_secret_file(settings.tls_cert_file, "tls_cert_file", needed_for),
        )
    return ChannelSecurity(tls=True, root_certificates=roots, client_key_pair=key_pair, token=token)


def client_security_from_env(environ: Mapping[str, str] | None = None) -> ChannelSecurity:
    """A command-line client's: SWAPLINE_TOKEN (a tenant's token) and SWAPLINE_CA_FILE (TLS when set)."""
    source = os.environ if environ is None else environ
    token = source.get(TOKEN_ENV, "").strip()
    ca_file = source.get(CA_FILE_ENV, "").strip()
    roots = read_secret_file(Path(ca_file), CA_FILE_ENV, "") if ca_file else None
    return ChannelSecurity(tls=bool(ca_file), root_certificates=roots, token=StaticToken(token) if token else None)


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    return ((AUTHORIZATION, f"Bearer {token}"),)


class _BearerCallCredentials(grpc.AuthMetadataPlugin):
    """Runs on a gRPC thread for each call, so re-reading a changed token file blocks no event loop."""

    def __init__(self, token: TokenSource) -> None:
        self._token = token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        if self._token.refresh_due():
            self._token.refresh()
        callback(bearer_metadata(self._token.value), None)


class _BearerMetadata:
    def __init__(self, token: TokenSource) -> None:
        self._token = token

    async def details(self, call: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if self._token.refresh_due():
            await asyncio.to_thread(self._token.refresh)
        metadata = grpc.aio.Metadata(*(call.metadata or ()))
        metadata.add(*bearer_metadata(self._token.value)[0])
        return grpc.aio.ClientCallDetails(call.method, call.timeout, metadata, call.credentials, call.wait_for_ready)


# grpc.aio files an interceptor under the first call kind it implements, so each kind has its own class.
class _UnaryUnaryBearer(_BearerMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self.details(client_call_details), request)


class _UnaryStreamBearer(_BearerMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(await self.details(client_call_details), request)


class _StreamUnaryBearer(_BearerMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self.details(client_call_details), request_iterator)


class _StreamStreamBearer(_BearerMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(await self.details(client_call_details), request_iterator)


# (first, longest) wait between attempts to reach a server that is down.
RECONNECT_BACKOFF_MS = (500, 2000)
# The shortest wait between two DNS resolutions of a channel's name. A client resolves again when a connection
# closes (a server's max connection age, a pod gone); at gRPC's default of 30 s a pod replacing the only one
# (a Recreate update: a new address) could wait half a minute for its first call.
MIN_RESOLUTION_INTERVAL_MS = RECONNECT_BACKOFF_MS[1]


def balancing_options() -> list[tuple[str, Any]]:
    """A `dns:///` name's calls spread over every address it resolves to (a headless Service's pods), and its
    addresses resolved again soon after a connection closes, so pods added since are found."""
    return [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.dns_min_time_between_resolutions_ms", MIN_RESOLUTION_INTERVAL_MS),
    ]


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, keepalive: KeepalivePolicy = KEEPALIVE
) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC's default reconnect backoff grows to minutes: after a 60 s outage of a stage service its
        # clients would next try about 70 s in, past their calls' deadlines. Capped, they are back within
        # a few seconds of the service.
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        *keepalive.client_options(),
    ]


def channel_credentials(security: ChannelSecurity) -> grpc.ChannelCredentials:
    """TLS credentials with the token as call credentials (for TLS channels only)."""
    key, certificate = security.client_key_pair or (None, None)
    credentials = grpc.ssl_channel_credentials(security.root_certificates, key, certificate)
    if security.token is None:
        return credentials
    return grpc.composite_channel_credentials(
        credentials, grpc.metadata_call_credentials(_BearerCallCredentials(security.token))
    )


def open_channel(
    target: str,
    security: ChannelSecurity,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive: KeepalivePolicy = KEEPALIVE,
) -> grpc.aio.Channel:
    """`dns:///name:port` targets are balanced round-robin across a headless Service's pods (balancing_options).

    `unix:` targets stay plaintext (a unix socket is protected by file permissions) but carry the token.
    """
    options = [*channel_options(max_message_bytes, keepalive), *balancing_options()]
    if security.tls and not target.startswith(_UNIX_SCHEMES):
        return grpc.aio.secure_channel(target, channel_credentials(security), options=options)
    interceptors: list[Any] = []
    if security.token is not None:
        interceptors = [
            kind(security.token)
            for kind in (_UnaryUnaryBearer, _UnaryStreamBearer, _StreamUnaryBearer, _StreamStreamBearer)
        ]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)

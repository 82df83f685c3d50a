"""One serve() for every service: aio servers, TLS, authentication, health, reflection, metrics, SIGTERM drain.

Public services are served on `port`. Internal ones (the chunk queue, the stage services) are served on
`internal_port` by a process that has both, and on `port` by one that has only internal services. Each
port is its own grpc.aio.Server with its own health service and authentication, so a network policy can
let only workers reach the internal port, and a public token never opens an internal service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.call_auth import Audience, CallAuthenticator, CallAuthInterceptor
from services.common.grpc_interceptors import ErrorMappingInterceptor
from services.common.grpc_keepalive import KEEPALIVE, KeepalivePolicy
from services.common.server_settings import AuthMode, ServerSettings
from services.common.settings_loader import SettingsError
from services.common.tenant_context import LOCAL_TENANT
from services.common.token_file import (
    TenantTokens,
    WatchedFile,
    parse_internal_token,
    parse_tenant_tokens,
    read_secret_file,
    watch_token_file,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer, the generated function that registers it, its full service name, and who may call it."""

    servicer: Any
    register: Callable[[Any, grpc.aio.Server], None]
    full_name: str
    # Internal unless marked public: a binding nobody thought about stays closed to users.
    audience: Audience = "internal"


def server_options(settings: ServerSettings, keepalive: KeepalivePolicy = KEEPALIVE) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        *keepalive.server_options(),
    ]
    if settings.max_connection_age_seconds > 0:
        # Calls in flight when the age is reached get the drain time to finish.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.drain_seconds * 1000)),
        ]
    return options


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@dataclass(frozen=True)
class ServerSecurity:
    """What the settings' files hold: the server certificate, the CA of client certificates, the tokens."""

    mode: AuthMode
    # (private key, certificate chain) in PEM; None: plaintext.
    key_pair: tuple[bytes, bytes] | None = None
    # mtls: the CA that signed the certificates callers of internal services must show.
    client_ca: bytes | None = None
    tenant_tokens: WatchedFile[TenantTokens] | None = None
    internal_token: WatchedFile[str] | None = None

    def credentials(self, audience: Audience) -> grpc.ServerCredentials | None:
        if self.key_pair is None:
            return None
        verify_clients = audience == "internal" and self.client_ca is not None
        return grpc.ssl_server_credentials(
            [self.key_pair],
            root_certificates=self.client_ca if verify_clients else None,
            require_client_auth=verify_clients,
        )

    def authenticator(self, audience: Audience) -> CallAuthenticator:
        return CallAuthenticator(
            audience,
            self.mode,
            self.tenant_tokens,
            self.internal_token,
            trusts_client_certificates=audience == "internal" and self.client_ca is not None,
        )


def _check_key_pair(settings: ServerSettings) -> None:
    """A certificate and key that do not belong together fail here, by name, not at the first handshake."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(settings.tls_cert_file), str(settings.tls_key_file)
        )
    except ssl.SSLError as error:
        raise SettingsError(
            f"tls_cert_file and tls_key_file do not hold a PEM certificate and its key ({error.reason})",
            "tls_cert_file",
        ) from None


def load_server_security(settings: ServerSettings, serves_public: bool, serves_internal: bool) -> ServerSecurity:
    """Reads the files the settings name; a SettingsError naming the setting when one is missing or unusable."""
    key_pair = client_ca = None
    if settings.transport_security != "plaintext":
        needed_for = f"when transport_security is {settings.transport_security}"
        certificate = read_secret_file(settings.tls_cert_file, "tls_cert_file", needed_for)
        key = read_secret_file(settings.tls_key_file, "tls_key_file", needed_for)
        _check_key_pair(settings)
        key_pair = (key, certificate)
        if settings.transport_security == "mtls":
            client_ca = read_secret_file(
                settings.tls_ca_file, "tls_ca_file", "when transport_security is mtls (it verifies the callers)"
            )
    if settings.auth_mode == "open":
        return ServerSecurity("open", key_pair, client_ca)
    tenant_tokens = None
    if serves_public and settings.tenant_tokens_file is None:
        # A fresh install has no tenants yet: the gateway serves (probes pass, workers connect) and
        # refuses every public call until a tokens Secret is mounted, rather than crash-looping.
        log.warning("no tenant_tokens_file: every public call without the internal token is refused")
    elif serves_public:
        tenant_tokens = watch_token_file(
            settings.tenant_tokens_file,
            parse_tenant_tokens,
            "tenant_tokens_file",
            "when auth_mode is token and public services are served",
        )
    # Under mtls callers on TCP show a certificate instead; callers on the unix socket cannot.
    token_needed = serves_internal and (client_ca is None or bool(settings.unix_socket))
    internal_token = None
    if token_needed or settings.internal_token_file is not None:
        internal_token = watch_token_file(
            settings.internal_token_file,
            parse_internal_token,
            "internal_token_file",
            "when auth_mode is token and internal services are served without mtls (or on a unix socket)",
        )
    return ServerSecurity("token", key_pair, client_ca, tenant_tokens, internal_token)


def _warn_if_unprotected(settings: ServerSettings) -> None:
    if settings.transport_security == "plaintext":
        log.warning(
            "PLAINTEXT: serving on %s without TLS (transport_security=plaintext); whoever reaches the port"
            " can read and alter every call. Use it on loopback only.",
            settings.host,
        )
    if settings.auth_mode == "open":
        log.warning(
            "OPEN MODE: no caller is asked for credentials (auth_mode=open); every job belongs to tenant %r."
            " Use it on loopback only.",
            LOCAL_TENANT,
        )


@dataclass(frozen=True)
class Listener:
    """One port: its server, its health service and the services it serves."""

    audience: Audience
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    names: tuple[str, ...]


class RunningServer:
    """Started listeners. `port` serves the public services (or, without any, the internal ones);
    `internal_port` serves the internal services (the same as `port` when there are no public ones; None
    when there are no internal ones). `server` and `health` are `port`'s."""

    def __init__(self, listeners: Sequence[Listener], drain_seconds: float) -> None:
        self.listeners = tuple(listeners)
        self.server = self.listeners[0].server
        self.health = self.listeners[0].health
        self.port = self.listeners[0].port
        self.internal_port = next((each.port for each in self.listeners if each.audience == "internal"), None)
        self._drain_seconds = drain_seconds

    async def drain(self) -> None:
        """Reports NOT_SERVING first so load balancers stop sending, then lets calls finish."""
        for listener in self.listeners:
            for name in ("", *listener.names):
                await listener.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.stop(self._drain_seconds)

    async def stop(self, grace: float | None = None) -> None:
        await asyncio.gather(*(listener.server.stop(grace) for listener in self.listeners))


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, credentials))
    except RuntimeError as error:
        raise OSError(f"could not bind {address}: {error}") from error


def _bind_unix_socket(server: grpc.aio.Server, path: str) -> None:
    """Unix sockets carry no TLS: only the service user may connect (connecting needs write permission)."""
    # The socket is created 0600 rather than chmod-ed after, so nobody connects in between.
    previous_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as error:
        raise OSError(f"could not listen on the unix socket {path}: {error}") from error
    finally:
        os.umask(previous_umask)
    os.chmod(path, 0o600)


async def _start_listener(
    settings: ServerSettings,
    security: ServerSecurity,
    audience: Audience,
    bindings: Sequence[ServiceBinding],
    port: int,
    unix_socket: str,
    keepalive: KeepalivePolicy,
) -> Listener:
    server = grpc.aio.server(
        # Authentication runs inside the error mapping, so Unauthenticated is answered like any domain error.
        interceptors=[ErrorMappingInterceptor(), CallAuthInterceptor(security.authenticator(audience))],
        options=server_options(settings, keepalive),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for binding in bindings:
        binding.register(binding.servicer, server)
    names = tuple(binding.full_name for binding in bindings)
    if settings.reflection:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{port}"
    bound = _bind(server, address, security.credentials(audience))
    if bound == 0:
        raise OSError(f"could not bind {address}")
    if unix_socket:
        _bind_unix_socket(server, unix_socket)
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Listener(audience, server, health_servicer, bound, names)


async def start_server(
    settings: ServerSettings, bindings: Sequence[ServiceBinding], keepalive: KeepalivePolicy = KEEPALIVE
) -> RunningServer:
    """Public bindings on settings.port and internal ones on settings.internal_port; with only one
    audience, on settings.port. The unix socket, if any, serves the internal bindings."""
    public = [binding for binding in bindings if binding.audience == "public"]
    internal = [binding for binding in bindings if binding.audience == "internal"]
    security = await asyncio.to_thread(load_server_security, settings, bool(public), bool(internal))
    _warn_if_unprotected(settings)
    plan: list[tuple[Audience, list[ServiceBinding], int]] = []
    if public:
        plan.append(("public", public, settings.port))
    if internal or not public:
        plan.append(("internal", internal, settings.internal_port if public else settings.port))
    listeners: list[Listener] = []
    try:
        for index, (audience, group, port) in enumerate(plan):
            unix_socket = settings.unix_socket if index == len(plan) - 1 else ""
            listeners.append(await _start_listener(settings, security, audience, group, port, unix_socket, keepalive))
    except BaseException:
        await asyncio.gather(*(listener.server.stop(None) for listener in listeners))
        raise
    return RunningServer(listeners, settings.drain_seconds)


def start_metrics(settings: ServerSettings) -> WSGIServer:
    """The Prometheus endpoint, over TLS (the server's certificate) unless transport_security is plaintext."""
    if settings.transport_security == "plaintext":
        server, _ = start_http_server(settings.metrics_port, addr=settings.host)
    else:
        server, _ = start_http_server(
            settings.metrics_port,
            addr=settings.host,
            certfile=str(settings.tls_cert_file),
            keyfile=str(settings.tls_key_file),
        )
    return server


def listening_lines(name: str, host: str, running: RunningServer) -> list[str]:
    """`<name> listening on HOST:PORT` for the public (or only) port first, then, when it is another one,
    `<name> internal listening on HOST:PORT`."""
    lines = [f"{name} listening on {host}:{running.port}"]
    if running.internal_port is not None and running.internal_port != running.port:
        lines.append(f"{name} internal listening on {host}:{running.internal_port}")
    return lines


async def serve(
    settings: ServerSettings,
    bindings: Sequence[ServiceBinding],
    name: str,
    background: Sequence[Callable[[], Any]] = (),
) -> None:
    """Runs until SIGTERM or SIGINT, then drains. `background` coroutines run beside the server."""
    configure_logging(settings.log_level)
    # First: a missing certificate or token file stops the start before anything listens.
    running = await start_server(settings, bindings)
    if settings.metrics_port >= 0:
        start_metrics(settings)
    # The bound ports go to stdout so a parent process that asked for port 0 can find them.
    for line in listening_lines(name, settings.host, running):
        print(line, flush=True)
    log.info("%s serving on %s:%d (internal: %s)", name, settings.host, running.port, running.internal_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(job()) for job in background]
    await stop.wait()
    log.info("%s draining", name)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await running.drain()

"""What every service's settings carry: where it listens, how it drains, and how callers are trusted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common.settings_loader import ValidatedSettings, ranged

# Raw 1080p RGB frames travel in batches; 256 MiB leaves room for a batch of 32.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_PORT = 65535

# tls: server certificate; mtls: server certificate and, on the internal port, a client certificate
# signed by tls_client_ca_file; plaintext: no TLS (loopback and tests only, and said so at start).
TransportSecurity = Literal["tls", "mtls", "plaintext"]
# token: public calls carry a tenant's bearer token, internal calls the service token (or a client
# certificate under mtls); open: nobody is asked, every job belongs to the tenant "local".
AuthMode = Literal["token", "open"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"]


@dataclass(frozen=True, kw_only=True)
class ServerSettings(ValidatedSettings):
    host: str = ranged("127.0.0.1", max_length=255)
    port: int = ranged(0, ge=0, le=MAX_PORT)
    # The port of internal services (a gateway's chunk queue) on a server that also has public ones;
    # 0 picks a free one. Servers with only internal services serve them on `port`.
    internal_port: int = ranged(0, ge=0, le=MAX_PORT)
    # A Unix socket path to listen on as well (empty: none). Clients on the same machine reach it
    # as `unix:<path>`: raw frames skip the TCP stack (about 10% of a frame hop's CPU on loopback).
    # Protected by file permissions: its directory is reachable by the service user only.
    unix_socket: str = ranged("", max_length=107)
    # -1: no metrics endpoint.
    metrics_port: int = ranged(0, ge=-1, le=MAX_PORT)
    # Seconds in-flight calls get to finish after SIGTERM; the chart's grace period is longer.
    drain_seconds: float = ranged(10.0, ge=0.0, le=3600.0)
    max_message_bytes: int = ranged(DEFAULT_MAX_MESSAGE_BYTES, ge=4 * 1024 * 1024, le=2**31 - 1)
    # Clients reconnect after this long, so new pods behind a headless Service get traffic; 0 = never.
    max_connection_age_seconds: float = ranged(0.0, ge=0.0)
    log_level: LogLevel = "INFO"
    transport_security: TransportSecurity = "tls"
    # PEM files (a Kubernetes Secret of type kubernetes.io/tls mounts tls.crt and tls.key).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # CA that signed the servers this process calls (verifies them) and, under mtls, its callers.
    tls_ca_file: Path | None = None
    auth_mode: AuthMode = "token"
    # Public tenants: a file of `token tenant` lines (a Secret key); read by servers with public services.
    tenant_tokens_file: Path | None = None
    # The internal service token: sent on calls to internal services and required by them (unless mtls).
    internal_token_file: Path | None = None
    # gRPC server reflection; off unless asked for (it lists every method to whoever connects).
    reflection: bool = False

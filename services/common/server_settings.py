"""What every service's settings carry: where it listens and how it drains."""

from __future__ import annotations

from dataclasses import dataclass

# Raw 1080p RGB frames travel in batches; 256 MiB leaves room for a batch of 32.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    # A Unix socket path to listen on as well (empty: none). Clients on the same machine reach it
    # as `unix:<path>`: raw frames skip the TCP stack (about 10% of a frame hop's CPU on loopback).
    unix_socket: str = ""
    metrics_port: int = 0
    # Seconds in-flight calls get to finish after SIGTERM; the chart's grace period is longer.
    drain_seconds: float = 10.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Clients reconnect after this long, so new pods behind a headless Service get traffic; 0 = never.
    max_connection_age_seconds: float = 0.0
    log_level: str = "INFO"

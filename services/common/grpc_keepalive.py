"""One keepalive policy for both ends of every channel, so servers never answer a client's pings with GOAWAY.

Clients ping idle connections (a watch or a lease wait may be silent for minutes, and a proxy or NAT
would drop the connection unnoticed); gRPC servers by default allow one ping per 5 minutes on a
connection without calls and send GOAWAY "too_many_pings" after the third early one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_CLIENT_PING_SECONDS = 30.0
# A ping unanswered this long closes the connection, so the next call reconnects instead of hanging.
DEFAULT_PING_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True)
class KeepalivePolicy:
    client_ping_seconds: float = DEFAULT_CLIENT_PING_SECONDS
    ping_timeout_seconds: float = DEFAULT_PING_TIMEOUT_SECONDS

    @property
    def server_min_ping_ms(self) -> int:
        # Half the clients' interval: timers and network delays can bring two pings closer than they were sent.
        return int(self.client_ping_seconds * 1000 / 2)

    def client_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", int(self.client_ping_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.ping_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # 0: keep pinging however long the connection stays idle (gRPC's default stops after 2).
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, Any]]:
        return [
            # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; gRPC ignores unknown keys, such as the
            # macro's name spelled as a key, and keeps its 5-minute minimum.
            ("grpc.http2.min_ping_interval_without_data_ms", self.server_min_ping_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]


KEEPALIVE = KeepalivePolicy()

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_channel import PLAINTEXT, open_channel
from services.common.grpc_keepalive import KEEPALIVE, KeepalivePolicy
from services.common.grpc_server import start_server
from services.common.server_settings import ServerSettings

# gRPC clients send at most one ping a second, so the idle window covers several pings: a server with
# gRPC's defaults answers the third early ping with GOAWAY "too_many_pings" after about 3 s.
FAST = KeepalivePolicy(client_ping_seconds=1.0)
IDLE_SECONDS = 5.0


def test_servers_accept_pings_at_the_clients_interval() -> None:
    client = dict(KEEPALIVE.client_options())
    server = dict(KEEPALIVE.server_options())
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == client["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0


def test_an_idle_connection_that_pings_is_kept() -> None:
    settings = ServerSettings(transport_security="plaintext", auth_mode="open", metrics_port=-1)

    async def idle() -> tuple[grpc.ChannelConnectivity, grpc.ChannelConnectivity | None]:
        running = await start_server(settings, [], keepalive=FAST)
        try:
            async with open_channel(f"127.0.0.1:{running.port}", PLAINTEXT, keepalive=FAST) as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                connected = channel.get_state()
                try:
                    # A GOAWAY turns the channel IDLE; waiting for that is the check, the timeout its pass.
                    await asyncio.wait_for(channel.wait_for_state_change(connected), IDLE_SECONDS)
                except TimeoutError:
                    return connected, None
                return connected, channel.get_state()
        finally:
            await running.stop(None)

    connected, changed_to = asyncio.run(idle())
    assert connected == grpc.ChannelConnectivity.READY
    assert changed_to is None, f"the idle connection went {changed_to} while pinging"

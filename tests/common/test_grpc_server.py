from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_server import server_options, start_server
from services.common.server_settings import ServerSettings


def test_connection_age_is_off_by_default() -> None:
    names = dict(server_options(ServerSettings()))
    assert "grpc.max_connection_age_ms" not in names
    assert names["grpc.max_receive_message_length"] == ServerSettings().max_message_bytes


def test_connection_age_and_its_grace_follow_the_settings() -> None:
    options = dict(server_options(ServerSettings(max_connection_age_seconds=300, drain_seconds=7.5)))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 7_500


async def _health_over(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return int(response.status)


def test_a_server_with_a_unix_socket_answers_on_it_and_on_tcp() -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="swapline-test-"))
    socket_path = socket_dir / "service.sock"

    async def serve_and_check() -> tuple[int, int]:
        running = await start_server(ServerSettings(unix_socket=str(socket_path)), [])
        try:
            return await _health_over(f"unix:{socket_path}"), await _health_over(f"127.0.0.1:{running.port}")
        finally:
            await running.server.stop(None)

    try:
        assert asyncio.run(serve_and_check()) == (health_pb2.HealthCheckResponse.SERVING,) * 2
    finally:
        shutil.rmtree(socket_dir)


def test_a_unix_socket_that_cannot_be_bound_is_named_in_the_error() -> None:
    missing = "/nonexistent-swapline-dir/service.sock"

    async def start() -> None:
        running = await start_server(ServerSettings(unix_socket=missing), [])
        await running.server.stop(None)

    with pytest.raises(OSError, match=missing):
        asyncio.run(start())

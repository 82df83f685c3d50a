"""An in-process grpc.aio server for one test body: the worker's clients call real or fake services through it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc


async def serving(
    register: Callable[[grpc.aio.Server], None],
    body: Callable[[grpc.aio.Channel], Awaitable[Any]],
    timeout: float = 10.0,
) -> Any:
    """Registers services on a server on a free port, runs `body` with a channel to it, and stops the server."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await asyncio.wait_for(body(channel), timeout=timeout)
    finally:
        await server.stop(None)

"""Runs a grpc.aio server on its own event loop thread so plain, blocking stubs can call it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import grpc

from services.common.grpc_server import ServiceBinding, server_options, start_server
from services.common.server_settings import ServerSettings


@contextmanager
def serving(settings: ServerSettings, bindings: Sequence[ServiceBinding]) -> Iterator[grpc.Channel]:
    """Starts the services on settings.port (0: any free port) and yields a channel to them."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(start_server(settings, bindings), loop).result(timeout=30)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=server_options(settings)) as channel:
                yield channel
        finally:
            asyncio.run_coroutine_threadsafe(running.server.stop(None), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()

"""One serve() for every service: aio server, health, reflection, metrics, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.grpc_interceptors import ErrorMappingInterceptor
from services.common.server_settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer, the generated function that registers it, and its full service name."""

    servicer: Any
    register: Callable[[Any, grpc.aio.Server], None]
    full_name: str


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
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


class RunningServer:
    """A started server; `port` is the bound one (settings may ask for 0)."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int,
                 names: Sequence[str], drain_seconds: float) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self._names = names
        self._drain_seconds = drain_seconds

    async def drain(self) -> None:
        """Reports NOT_SERVING first so load balancers stop sending, then lets calls finish."""
        for name in ("", *self._names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self._drain_seconds)


async def start_server(settings: ServerSettings, bindings: Sequence[ServiceBinding]) -> RunningServer:
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor()],
        options=server_options(settings),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for binding in bindings:
        binding.register(binding.servicer, server)
    names = [binding.full_name for binding in bindings]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    if settings.unix_socket:
        try:
            server.add_insecure_port(f"unix:{settings.unix_socket}")
        except RuntimeError as error:
            raise OSError(f"could not listen on the unix socket {settings.unix_socket}: {error}") from error
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, port, names, settings.drain_seconds)


async def serve(
    settings: ServerSettings,
    bindings: Sequence[ServiceBinding],
    name: str,
    background: Sequence[Callable[[], Any]] = (),
) -> None:
    """Runs until SIGTERM or SIGINT, then drains. `background` coroutines run beside the server."""
    configure_logging(settings.log_level)
    if settings.metrics_port >= 0:
        start_http_server(settings.metrics_port, addr=settings.host)
    running = await start_server(settings, bindings)
    # The bound port goes to stdout so a parent process that asked for port 0 can find it.
    print(f"{name} listening on {settings.host}:{running.port}", flush=True)
    log.info("%s serving on %s:%d", name, settings.host, running.port)
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

"""`python -m services.advisor`: AdvisorService and autoscaling gauges on SWAPLINE_ADVISOR_* settings."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from services.advisor.advisor_state import AdvisorState
from services.advisor.scaling_loop import refresh_scaling_forever
from services.advisor.servicer import SERVICE_NAME, AdvisorServicer
from services.advisor.settings import ENV_PREFIX, AdvisorSettings
from services.common.grpc_channel import channel_security, open_channel
from services.common.grpc_server import ServiceBinding, serve
from services.common.settings_check import service_settings
from swapline.advisor.v1 import advisor_pb2_grpc
from swapline.jobs.v1 import jobs_pb2_grpc


def background_loops(state: AdvisorState) -> list[Callable[[], Awaitable[None]]]:
    """The autoscaling gauges, and the cluster's GPU nodes where the settings ask for them."""
    loops: list[Callable[[], Awaitable[None]]] = [lambda: refresh_scaling_forever(state)]
    settings = state.settings
    if settings.cluster_nodes == "in_cluster":
        # Imported here: the Kubernetes client is loaded only where it is used.
        from services.advisor.cluster_nodes import (
            KubernetesNodeReader,
            in_cluster_configuration,
            refresh_cluster_forever,
        )

        read_nodes = KubernetesNodeReader(in_cluster_configuration, settings.cluster_nodes_timeout_seconds)
        loops.append(
            lambda: refresh_cluster_forever(
                state.cluster, read_nodes, state.catalog, settings.cluster_nodes_refresh_seconds
            )
        )
    return loops


async def run(settings: AdvisorSettings) -> None:
    # The internal token lets the advisor read every tenant's jobs.
    channel = open_channel(settings.gateway_target, channel_security(settings), settings.max_message_bytes)
    state = AdvisorState.from_settings(settings, jobs_pb2_grpc.JobServiceStub(channel))
    # Internal: its fleet report aggregates every tenant's jobs, so only the gateway and operators holding
    # the internal token may ask.
    binding = ServiceBinding(
        AdvisorServicer(state), advisor_pb2_grpc.add_AdvisorServiceServicer_to_server, SERVICE_NAME
    )
    try:
        await serve(settings, [binding], "advisor", background=background_loops(state))
    finally:
        await channel.close()


def main() -> None:
    asyncio.run(run(service_settings("advisor", AdvisorSettings, ENV_PREFIX)))


if __name__ == "__main__":
    main()

"""`python -m services.advisor`: AdvisorService and autoscaling gauges on SWAPLINE_ADVISOR_* settings."""

from __future__ import annotations

import asyncio

from services.advisor.advisor_state import AdvisorState
from services.advisor.scaling_loop import refresh_scaling_forever
from services.advisor.servicer import SERVICE_NAME, AdvisorServicer
from services.advisor.settings import ENV_PREFIX, AdvisorSettings
from services.common.grpc_channel import channel_security, open_channel
from services.common.grpc_server import ServiceBinding, serve
from services.common.settings_check import service_settings
from swapline.advisor.v1 import advisor_pb2_grpc
from swapline.jobs.v1 import jobs_pb2_grpc


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
        await serve(settings, [binding], "advisor", background=[lambda: refresh_scaling_forever(state)])
    finally:
        await channel.close()


def main() -> None:
    asyncio.run(run(service_settings("advisor", AdvisorSettings, ENV_PREFIX)))


if __name__ == "__main__":
    main()

"""`python -m services.gateway`: the public JobService and the workers' ChunkQueueService in one process."""

from __future__ import annotations

import asyncio

from services.common.frames.frame_allocator import return_large_blocks
from services.common.grpc_channel import channel_security
from services.common.grpc_server import serve
from services.common.settings_check import service_settings
from services.gateway.gateway_parts import assemble_gateway
from services.gateway.job_store import open_job_store
from services.gateway.media_clients import GrpcMediaServices
from services.gateway.media_retention import MediaRetention
from services.gateway.settings import ENV_PREFIX, GatewaySettings


async def run(settings: GatewaySettings) -> None:
    settings.media_root.mkdir(parents=True, exist_ok=True)
    store = open_job_store(settings.database_url, settings.media_root)
    # Before serving: the joins a previous gateway left unfinished (and, with SQLite, its leases) resume.
    joining = store.recover_after_restart()
    media = GrpcMediaServices(
        settings.decoder_target,
        settings.detector_target,
        settings.encoder_target,
        settings.downstream_timeout_seconds,
        settings.join_timeout_seconds,
        channel_security(settings),
        settings.max_message_bytes,
    )
    parts = assemble_gateway(settings, store, media)
    retention = MediaRetention(settings.retention_policy(), store, settings.media_root)
    try:
        await serve(
            settings,
            parts.bindings(),
            "gateway",
            background=[
                parts.queue.reap_forever,
                lambda: parts.coordinator.resume_joins(joining),
                parts.jobs.follow_other_gateways,
                retention.sweep_forever,
                lambda: parts.coordinator.refresh_counts_forever(settings.store_counts_refresh_seconds),
            ],
        )
    finally:
        await media.close()
        store.close()


def main() -> None:
    settings = service_settings("gateway", GatewaySettings, ENV_PREFIX)
    return_large_blocks()
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()

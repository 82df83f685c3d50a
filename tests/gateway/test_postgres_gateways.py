"""Two gateways on one real PostgreSQL, as in a cluster: a watch on one hears what the other does, and a
query waiting in PostgreSQL leaves the event loop serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import cv2
import grpc
import psycopg
import pytest
from skimage import data as skimage_data

from services.common.grpc_channel import PLAINTEXT, open_channel
from services.common.grpc_server import ServiceBinding, start_server
from services.common.server_settings import ServerSettings
from services.gateway.gateway_parts import GatewayParts, assemble_gateway
from services.gateway.job_service import JobService
from services.gateway.media_clients import GrpcMediaServices
from services.gateway.postgres_job_store import JOB_CHANGES_CHANNEL, PostgresJobStore
from services.gateway.settings import GatewaySettings
from swapline.chunks.v1 import chunks_pb2_grpc
from swapline.decoder.v1 import decoder_pb2_grpc
from swapline.detector.v1 import detector_pb2_grpc
from swapline.encoder.v1 import encoder_pb2_grpc
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.gateway.test_servicer import (
    FakeDecoder,
    FakeDetector,
    FakeEncoder,
    Gateway,
    encoded,
    run_every_chunk,
    submit_messages,
)
from tests.support.postgres_server import POLL_SECONDS, session_postgres

# Longer than any test here: only the other gateway's notification can end these watches in time.
NO_KEEPALIVE_SECONDS = 3600.0
FACE_JPEG = encoded(cv2.resize(skimage_data.astronaut(), (512, 448)))


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    """A database of the test's own, so no other test's gateway is listening on it."""
    return session_postgres(request.config).create_database(request.node.name)


def with_keepalive(parts: GatewayParts, settings: GatewaySettings, media: GrpcMediaServices) -> GatewayParts:
    """The parts assemble_gateway gives, with a JobService whose watches send no keepalive in a test's time."""
    jobs = JobService(
        parts.coordinator,
        parts.queue,
        media,
        settings.media_root,
        settings.chunk_seconds,
        settings.max_upload_bytes,
        settings.input_limits(),
        watch_keepalive_seconds=NO_KEEPALIVE_SECONDS,
    )
    return replace(parts, jobs=jobs)


def listeners(url: str) -> int:
    """Sessions on the database whose last statement was the gateways' LISTEN (and that now wait on it)."""
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
            (f"LISTEN {JOB_CHANGES_CHANNEL}",),
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_for(condition: str, check: Callable[[], bool], timeout_seconds: float = 10.0) -> None:
    """Polls `check` until it holds; fails naming `condition` after the timeout."""
    deadline = time.monotonic() + timeout_seconds
    while not check():
        assert time.monotonic() < deadline, f"not {condition} within {timeout_seconds} s"
        time.sleep(POLL_SECONDS)


@asynccontextmanager
async def gateways_on(database_url: str, tmp_path: Path, count: int) -> AsyncIterator[list[Gateway]]:
    """`count` gateways on the one database and media volume, each following the others as __main__ runs it."""
    media_root = tmp_path / "media"
    media_root.mkdir()
    detector, encoder = FakeDetector(), FakeEncoder(media_root)
    open_settings = ServerSettings(port=0, metrics_port=-1, transport_security="plaintext", auth_mode="open")
    async with AsyncExitStack() as stack:
        fakes = await start_server(
            open_settings,
            [
                ServiceBinding(FakeDecoder(media_root), decoder_pb2_grpc.add_DecoderServiceServicer_to_server, "d"),
                ServiceBinding(detector, detector_pb2_grpc.add_DetectorServiceServicer_to_server, "f"),
                ServiceBinding(encoder, encoder_pb2_grpc.add_EncoderServiceServicer_to_server, "e"),
            ],
        )
        stack.push_async_callback(fakes.server.stop, None)
        target = f"127.0.0.1:{fakes.port}"
        gateways = []
        for _ in range(count):
            settings = GatewaySettings(
                media_root=media_root,
                decoder_target=target,
                detector_target=target,
                encoder_target=target,
                chunk_seconds=1.0,
                port=0,
                metrics_port=-1,
                transport_security="plaintext",
                auth_mode="open",
            )
            store = PostgresJobStore(database_url, media_root)
            stack.callback(store.close)
            media = GrpcMediaServices(target, target, target, 10.0, 10.0, PLAINTEXT)
            stack.push_async_callback(media.close)
            parts = with_keepalive(assemble_gateway(settings, store, media), settings, media)
            server = await start_server(settings, parts.bindings())
            stack.push_async_callback(parts.coordinator.wait_for_joins)
            stack.push_async_callback(server.stop, None)
            following = asyncio.create_task(parts.jobs.follow_other_gateways())
            stack.callback(following.cancel)
            public = open_channel(f"127.0.0.1:{server.port}", PLAINTEXT)
            internal = open_channel(f"127.0.0.1:{server.internal_port}", PLAINTEXT)
            for channel in (public, internal):
                stack.push_async_callback(channel.close)
            gateways.append(
                Gateway(
                    jobs_pb2_grpc.JobServiceStub(public),
                    chunks_pb2_grpc.ChunkQueueServiceStub(internal),
                    parts,
                    detector,
                    encoder,
                    media_root,
                    f"127.0.0.1:{server.port}",
                )
            )
        await asyncio.to_thread(wait_for, "every gateway listening", lambda: listeners(database_url) == count)
        yield gateways


async def rest_of(watch: grpc.aio.UnaryStreamCall) -> list[jobs_pb2.JobEvent]:
    events = []
    while (event := await watch.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def test_a_job_submitted_on_one_gateway_and_watched_on_the_other_ends_on_both(
    postgres_url: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with gateways_on(postgres_url, tmp_path, 2) as (first, second):
            (first.media_root / "clip.mp4").write_bytes(b"video")
            spec = jobs_pb2.JobSpec(source_image=FACE_JPEG, target_uri="clip.mp4")
            job = await first.jobs.SubmitJob(iter(submit_messages(spec)))
            watches = [gateway.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id)) for gateway in (first, second)]
            for watch in watches:
                assert (await watch.read()).state == jobs_pb2.JOB_STATE_QUEUED
            # A worker of the first gateway runs every chunk; the first gateway joins them.
            await run_every_chunk(first)
            for watch in watches:
                events = await asyncio.wait_for(rest_of(watch), 20.0)
                assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
                assert events[-1].chunks_done == events[-1].chunks_total == job.chunks_total
            seen_by_second = await second.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
            assert seen_by_second.state == jobs_pb2.JOB_STATE_SUCCEEDED

    asyncio.run(asyncio.wait_for(scenario(), 60.0))


def test_a_query_waiting_in_postgresql_leaves_the_event_loop_serving(postgres_url: str, tmp_path: Path) -> None:
    # Without the fix the read would hold the loop until PostgreSQL gives up on the lock.
    waiting_url = f"{postgres_url}?options=-c%20lock_timeout%3D5000"

    def store_waits_on_a_lock() -> bool:
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            row = connection.execute("SELECT COUNT(*) FROM pg_locks WHERE NOT granted").fetchone()
        return row is not None and row[0] > 0

    async def scenario() -> None:
        async with gateways_on(waiting_url, tmp_path, 1) as (gateway,):
            (gateway.media_root / "clip.mp4").write_bytes(b"video")
            spec = jobs_pb2.JobSpec(source_image=FACE_JPEG, target_uri="clip.mp4")
            job = await gateway.jobs.SubmitJob(iter(submit_messages(spec)))
            with psycopg.connect(postgres_url) as other_client:
                other_client.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
                reading = asyncio.create_task(gateway.parts.jobs.get(job.id, None))
                # Only a loop left free gets here while the read still waits on the lock.
                await asyncio.to_thread(wait_for, "waiting on the lock", store_waits_on_a_lock)
                assert not reading.done()
                other_client.rollback()
            assert (await asyncio.wait_for(reading, 10.0)).id == job.id

    asyncio.run(asyncio.wait_for(scenario(), 60.0))

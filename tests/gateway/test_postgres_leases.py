"""Leasing with gateways on one real PostgreSQL: a lease waiting on one gateway is granted as soon as another
gateway adds work, and the chunk queue's and coordinator's store calls leave the event loop serving while
they wait in PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import grpc
import psycopg
import pytest

from services.common.errors import code_value
from services.gateway.chunk_queue import MAX_LEASE_WAIT_SECONDS
from services.gateway.job_records import ChunkStats, JobError
from swapline.jobs.v1 import jobs_pb2
from tests.gateway.test_postgres_gateways import FACE_JPEG, gateways_on, wait_for
from tests.gateway.test_servicer import Gateway, submit_messages
from tests.support.postgres_server import session_postgres

ResultT = TypeVar("ResultT")
# Well inside the lease's own wait: only the other gateway's announcement can grant it this soon.
PROMPT_SECONDS = 10.0
# A lock waited on longer than this fails the store call; without the store's thread, it held the loop as long.
LOCK_TIMEOUT_MS = 5000


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    """A database of the test's own, so no other test's gateway is listening on it."""
    return session_postgres(request.config).create_database(request.node.name)


async def submitted(gateway: Gateway) -> jobs_pb2.Job:
    (gateway.media_root / "clip.mp4").write_bytes(b"video")
    spec = jobs_pb2.JobSpec(source_image=FACE_JPEG, target_uri="clip.mp4")
    job: jobs_pb2.Job = await gateway.jobs.SubmitJob(iter(submit_messages(spec)))
    return job


def test_a_lease_waiting_on_one_gateway_is_granted_when_another_gateway_adds_work(
    postgres_url: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with gateways_on(postgres_url, tmp_path, 2) as (first, second):
            waiting = asyncio.create_task(second.parts.queue.lease("w", MAX_LEASE_WAIT_SECONDS))
            # The store's thread runs calls in turn: once this one has run, the lease has looked and found nothing.
            await second.parts.coordinator.store.run(lambda: None)
            assert not waiting.done()
            job = await submitted(first)
            lease = await asyncio.wait_for(waiting, PROMPT_SECONDS)
            assert lease is not None and lease.chunk.job_id == job.id

    asyncio.run(asyncio.wait_for(scenario(), 60.0))


def waits_on_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute("SELECT COUNT(*) FROM pg_locks WHERE NOT granted").fetchone()
    return row is not None and row[0] > 0


async def while_chunks_are_locked(url: str, operation: Awaitable[ResultT]) -> ResultT:
    """Runs the operation while another client holds the chunks table; it must wait there without holding
    up the event loop, and finish once the table is free."""
    with psycopg.connect(url) as other_client:
        other_client.execute("LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE")
        running = asyncio.ensure_future(operation)
        # Only a loop left free gets here while the operation still waits on the lock.
        await asyncio.to_thread(wait_for, "waiting on the lock", lambda: waits_on_a_lock(url))
        assert not running.done()
        other_client.rollback()
    return await asyncio.wait_for(running, 10.0)


def test_leasing_and_ending_jobs_wait_in_postgresql_off_the_event_loop(postgres_url: str, tmp_path: Path) -> None:
    waiting_url = f"{postgres_url}?options=-c%20lock_timeout%3D{LOCK_TIMEOUT_MS}"

    async def scenario() -> None:
        async with gateways_on(waiting_url, tmp_path, 1) as (gateway,):
            queue, coordinator = gateway.parts.queue, gateway.parts.coordinator
            job = await submitted(gateway)
            lease = await while_chunks_are_locked(postgres_url, queue.lease("w", 0))
            assert lease is not None
            answer = await while_chunks_are_locked(postgres_url, queue.heartbeat(lease.lease_id, 1, "swap", 1))
            assert not answer.stop
            stats = ChunkStats(lease.chunk.frame_count, 1, 1)
            await while_chunks_are_locked(postgres_url, queue.complete(lease.lease_id, lease.segment_uri, stats))
            second = await queue.lease("w", 0)
            assert second is not None
            unavailable = JobError(code_value(grpc.StatusCode.UNAVAILABLE), "triton went away")
            await while_chunks_are_locked(postgres_url, queue.fail(second.lease_id, unavailable, retryable=True))
            chunks = await coordinator.store.run(coordinator.store.list_chunks, job.id)
            assert [chunk.state for chunk in chunks[:2]] == ["DONE", "PENDING"]
            await while_chunks_are_locked(postgres_url, queue.reap_once())
            cancelled = await while_chunks_are_locked(postgres_url, coordinator.cancel_job(job.id))
            assert cancelled.state == "CANCELLED"

    asyncio.run(asyncio.wait_for(scenario(), 60.0))

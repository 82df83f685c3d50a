"""ListJobs pages by a cursor: over 120 jobs, while jobs are added and deleted between pages, no job stored for
the whole listing is missed or repeated, on SQLite and on PostgreSQL (two gateways taking turns)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from services.gateway.job_records import JobRecord, JobState
from services.gateway.job_store import JobStore
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.gateway.gateway_fakes import job_record
from tests.gateway.test_postgres_gateways import gateways_on
from tests.gateway.test_servicer import Gateway, run, status_of
from tests.support.postgres_server import session_postgres

PAGE_SIZE = 7
# Page with a page_token (empty for the first); the page's job ids and its next_page_token.
ListPage = Callable[[str], Awaitable[tuple[list[str], str]]]


def stored_job(job_id: str, created_at: float, tenant: str = "local") -> JobRecord:
    # Every other job has ended, so that retention may delete it mid-listing.
    state: JobState = "SUCCEEDED" if int(job_id[1:]) % 2 else "QUEUED"
    return replace(job_record(job_id, created_at, state=state), tenant=tenant)


async def page_through_while_changing(store: JobStore, list_page: ListPage) -> None:
    """120 jobs, three to an instant so pages end inside a tie; between pages two ended jobs are deleted (one
    listed, one not yet) and two are added, one newer than the cursor and one older than every job so far."""
    created = {f"j{number:03d}": 1000.0 + number // 3 for number in range(120)}
    for job_id, created_at in created.items():
        await asyncio.to_thread(store.add_job, stored_job(job_id, created_at), [])
    listed: list[str] = []
    deleted: set[str] = set()
    added_newer: set[str] = set()
    added_older: set[str] = set()
    token, pages = "", 0
    while True:
        ids, token = await list_page(token)
        listed.extend(ids)
        pages += 1
        if not token:
            break
        assert len(ids) == PAGE_SIZE
        unlisted_ended = [i for i in created if int(i[1:]) % 2 and i not in listed and i not in deleted]
        listed_ended = [i for i in listed if i in created and int(i[1:]) % 2 and i not in deleted]
        for victim in (*listed_ended[-1:], *unlisted_ended[-1:]):
            deleted.update(await asyncio.to_thread(store.delete_ended_jobs, [victim]))
        newer, older = f"n{pages:03d}", f"o{pages:03d}"
        await asyncio.to_thread(store.add_job, stored_job(newer, 5000.0 + pages), [])
        await asyncio.to_thread(store.add_job, stored_job(older, 500.0 - pages), [])
        added_newer.add(newer)
        added_older.add(older)
        assert pages < 100, "paging does not end"
    assert len(listed) == len(set(listed)), "a job was listed twice"
    present_throughout = set(created) - deleted
    assert present_throughout <= set(listed), f"missed: {sorted(present_throughout - set(listed))}"
    assert len(deleted) > 20
    # Jobs added meanwhile follow the order: newer than the cursor, never; older than every job, at the end.
    assert not added_newer & set(listed)
    assert listed[-len(added_older) :] == sorted(added_older)
    initial = [i for i in listed if i in created]
    assert initial == sorted(initial, key=lambda i: (created[i], i), reverse=True)
    assert pages >= 120 // PAGE_SIZE


def grpc_pages(jobs_of_turn: Callable[[int], jobs_pb2_grpc.JobServiceStub]) -> ListPage:
    turn = 0

    async def list_page(token: str) -> tuple[list[str], str]:
        nonlocal turn
        turn += 1
        stub = jobs_of_turn(turn)
        response = await stub.ListJobs(jobs_pb2.ListJobsRequest(limit=PAGE_SIZE, page_token=token))
        return [job.id for job in response.jobs], response.next_page_token

    return list_page


def test_sqlite_pages_over_120_jobs_while_jobs_come_and_go(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> None:
        store = gateway.parts.coordinator.store
        # Another tenant's jobs, interleaved, never show.
        for number in range(0, 120, 10):
            await asyncio.to_thread(store.add_job, stored_job(f"a{number:03d}", 1000.0 + number // 3, "acme"), [])
        await page_through_while_changing(store, grpc_pages(lambda _: gateway.jobs))

    run(tmp_path, scenario)


def test_a_token_is_tied_to_its_filter_and_tenant(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> None:
        store = gateway.parts.coordinator.store
        for number in range(6):
            await asyncio.to_thread(store.add_job, stored_job(f"j{number:03d}", 1000.0 + number), [])
            await asyncio.to_thread(store.add_job, stored_job(f"a{number:03d}", 1000.0 + number, "acme"), [])
        succeeded = jobs_pb2.ListJobsRequest(limit=2, state=jobs_pb2.JOB_STATE_SUCCEEDED)
        first = await gateway.jobs.ListJobs(succeeded)
        assert [job.id for job in first.jobs] == ["j005", "j003"] and first.next_page_token
        rest = await gateway.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(limit=2, state=jobs_pb2.JOB_STATE_SUCCEEDED, page_token=first.next_page_token)
        )
        assert [job.id for job in rest.jobs] == ["j001"] and rest.next_page_token == ""
        for stub, request in (
            (gateway.jobs, jobs_pb2.ListJobsRequest(limit=2, page_token=first.next_page_token)),
            (gateway.jobs, jobs_pb2.ListJobsRequest(state=jobs_pb2.JOB_STATE_QUEUED, page_token=first.next_page_token)),
            (gateway.jobs_as("acme"), replace_token(succeeded, first.next_page_token)),
        ):
            code, details = await status_of(stub.ListJobs(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "another filter" in details, details
        for garbage in ("not-a-token", "eyJ2IjoxfQ", "x" * 300):
            code, details = await status_of(gateway.jobs.ListJobs(jobs_pb2.ListJobsRequest(page_token=garbage)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details, details
        # A full last page says so: no token to an empty page.
        whole = await gateway.jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=6))
        assert len(whole.jobs) == 6 and whole.next_page_token == ""

    run(tmp_path, scenario)


def replace_token(request: jobs_pb2.ListJobsRequest, token: str) -> jobs_pb2.ListJobsRequest:
    copy = jobs_pb2.ListJobsRequest()
    copy.CopyFrom(request)
    copy.page_token = token
    return copy


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    return session_postgres(request.config).create_database(request.node.name)


def test_postgresql_pages_over_120_jobs_on_two_gateways_while_jobs_come_and_go(
    postgres_url: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with gateways_on(postgres_url, tmp_path, 2) as gateways:
            # Pages alternate between the gateways: a token of one is good on the other.
            list_page = grpc_pages(lambda turn: gateways[turn % 2].jobs)
            await page_through_while_changing(gateways[0].parts.coordinator.store, list_page)

    asyncio.run(asyncio.wait_for(scenario(), 60.0))

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.cli.job_client import JobClient
from services.common.errors import Unauthenticated
from services.common.grpc_channel import CA_FILE_ENV, TOKEN_ENV
from services.common.grpc_server import ServiceBinding, start_server
from services.common.server_settings import ServerSettings
from services.common.tenant_context import current_caller
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.common.tls_files import Pki, make_test_pki

ALICE_TOKEN = "alice-token-4f1c9a"


class _CallerJobs(jobs_pb2_grpc.JobServiceServicer):
    """Answers every job request with a job whose id is the calling tenant."""

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return jobs_pb2.Job(id=current_caller().tenant)

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext) -> Any:
        yield jobs_pb2.JobEvent(job_id=current_caller().tenant)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_gateway(pki: Pki, tmp_path: Path) -> Iterator[str]:
    """A JobService over TLS with token authentication, on its own loop thread; yields its address."""
    tenants = tmp_path / "tenants"
    tenants.write_text(f"{ALICE_TOKEN} alice\n")
    settings = ServerSettings(
        metrics_port=-1,
        tls_cert_file=pki.server.cert_file,
        tls_key_file=pki.server.key_file,
        tenant_tokens_file=tenants,
    )
    binding = ServiceBinding(
        _CallerJobs(), jobs_pb2_grpc.add_JobServiceServicer_to_server, "swapline.jobs.v1.JobService", "public"
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_server(settings, [binding]), loop).result(timeout=30)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(None), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_every_call_carries_the_token_over_tls(tls_gateway: str, pki: Pki) -> None:
    with JobClient(tls_gateway, token=ALICE_TOKEN, ca_file=pki.ca_file) as client:
        assert client.get("any").id == "alice"
        assert [event.job_id for event in client.watch("any")] == ["alice"]


def test_the_token_and_ca_come_from_the_environment(tls_gateway: str, pki: Pki) -> None:
    environ = {TOKEN_ENV: ALICE_TOKEN, CA_FILE_ENV: str(pki.ca_file)}
    with JobClient.from_env(tls_gateway, environ=environ) as client:
        assert client.get("any").id == "alice"


@pytest.mark.parametrize("token", ["", "wrong-token-4f1c9a"])
def test_a_call_without_a_valid_token_is_unauthenticated(tls_gateway: str, pki: Pki, token: str) -> None:
    with JobClient(tls_gateway, token=token, ca_file=pki.ca_file) as client, pytest.raises(Unauthenticated):
        client.get("any")

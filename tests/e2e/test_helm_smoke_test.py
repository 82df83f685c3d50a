"""The chart's `helm test` command, run as its pod runs it: against the running stack the sample job succeeds, an
unreachable gateway fails it with the reason, and its mounted files make it the internal caller over TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc

from services.cli.embedded_stack import REPOSITORY_ROOT, EmbeddedStack
from services.cli.smoke_test import build_parser, client_from
from services.common.grpc_server import ServiceBinding, start_server
from services.common.server_settings import ServerSettings
from services.common.tenant_context import current_caller
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.common.tls_files import make_test_pki
from tests.deploy.chart_render import objects_of, render

# The pod's own deadline in the chart; the sample takes seconds.
TIMEOUT_SECONDS = 600


def rendered_test_arguments(gateway: str) -> list[str]:
    """The open-mode chart's test pod arguments (module first), with the gateway pointed at `gateway`."""
    objects = objects_of(render({"security": {"openMode": True}}))
    (pod,) = [item for item in objects if item["kind"] == "Pod"]
    (container,) = pod["spec"]["containers"]
    arguments = list(container["args"])
    rendered_gateway = build_parser().parse_args(arguments[1:]).gateway
    return [gateway if argument == rendered_gateway else argument for argument in arguments]


def test_the_helm_test_command_submits_a_sample_job_that_succeeds(stack: EmbeddedStack) -> None:
    arguments = rendered_test_arguments(stack.gateway_address)
    # The image's ENTRYPOINT is ["python", "-m"].
    result = subprocess.run(
        [sys.executable, "-m", *arguments],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke test passed: job" in result.stdout
    assert "swapped 25 frames" in result.stdout


def test_the_helm_test_command_fails_with_the_reason_when_the_gateway_is_unreachable() -> None:
    arguments = rendered_test_arguments("127.0.0.1:1")
    result = subprocess.run(
        [sys.executable, "-m", *arguments], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "smoke test failed: UNAVAILABLE" in result.stderr


class _CallerJobs(jobs_pb2_grpc.JobServiceServicer):
    """Answers GetJob with whether the caller is internal."""

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return jobs_pb2.Job(id="internal" if current_caller().internal else current_caller().tenant)


def test_the_mounted_internal_token_and_ca_make_the_test_the_internal_caller_over_tls(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    token_file = tmp_path / "token"
    # As the Secret volume holds it: the token and a newline.
    token_file.write_text("internal-token-5b2e7d\n")
    settings = ServerSettings(
        metrics_port=-1,
        tls_cert_file=pki.server.cert_file,
        tls_key_file=pki.server.key_file,
        internal_token_file=token_file,
    )
    binding = ServiceBinding(
        _CallerJobs(), jobs_pb2_grpc.add_JobServiceServicer_to_server, "swapline.jobs.v1.JobService", "public"
    )

    async def scenario() -> str:
        server = await start_server(settings, [binding])
        try:
            args = [
                "--gateway",
                f"127.0.0.1:{server.port}",
                "--token-file",
                str(token_file),
                "--ca-file",
                str(pki.ca_file),
            ]
            with client_from(build_parser().parse_args(args)) as client:
                job = await asyncio.to_thread(client.get, "any")
            return job.id
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == "internal"

"""The CLI's job client: each submission carries one idempotency key, kept when it is sent again after
UNAVAILABLE, and `list` follows next_page_token."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from services.cli.job_client import JobClient
from services.common.errors import InvalidArgument
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc


class _FlakyJobs(jobs_pb2_grpc.JobServiceServicer):
    """Drops the first `failures` submissions (UNAVAILABLE); the job id is the key, as a gateway replays it.
    Lists 12 jobs in pages of `limit`, by an offset token."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.keys: list[str] = []
        self.uploaded: list[bytes] = []
        self.page_tokens: list[str] = []

    def SubmitJob(
        self, request_iterator: Iterator[jobs_pb2.SubmitJobRequest], context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        messages = list(request_iterator)
        self.keys.append(messages[0].spec.idempotency_key)
        self.uploaded.append(b"".join(message.target_chunk for message in messages[1:]))
        if self.failures:
            self.failures -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if not messages[0].spec.source_image:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no source")
        return jobs_pb2.Job(id=messages[0].spec.idempotency_key)

    def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext) -> jobs_pb2.ListJobsResponse:
        self.page_tokens.append(request.page_token)
        start = int(request.page_token or 0)
        end = min(start + request.limit, 12)
        return jobs_pb2.ListJobsResponse(
            jobs=[jobs_pb2.Job(id=f"j{number}") for number in range(start, end)],
            next_page_token=str(end) if end < 12 else "",
        )


@pytest.fixture
def flaky() -> Iterator[tuple[_FlakyJobs, JobClient]]:
    servicer = _FlakyJobs(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = JobClient(f"127.0.0.1:{port}", timeout_seconds=5.0)
    client._sleep = lambda _: None
    try:
        yield servicer, client
    finally:
        client.close()
        server.stop(None)


def test_a_submission_sent_again_after_unavailable_keeps_its_key(
    flaky: tuple[_FlakyJobs, JobClient], tmp_path: Path
) -> None:
    servicer, client = flaky
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"video bytes")
    job = client.submit(b"face", target_path=video)
    # Two attempts dropped, the third answered: one key for all three, each with the whole upload.
    assert len(servicer.keys) == 3 and len(set(servicer.keys)) == 1
    assert servicer.uploaded == [b"video bytes"] * 3
    assert job.id == servicer.keys[0] and len(job.id) == 36
    # The next submission (another `swapline submit`) has a key of its own; other errors are not retried.
    assert client.submit(b"face", target_uri="clip.mp4").id not in servicer.keys[:3]
    with pytest.raises(InvalidArgument):
        client.submit(b"", target_uri="clip.mp4")
    assert len(servicer.keys) == 5


def test_list_follows_next_page_token(flaky: tuple[_FlakyJobs, JobClient]) -> None:
    servicer, client = flaky
    assert [job.id for job in client.list(10)] == [f"j{number}" for number in range(10)]
    assert [job.id for job in client.jobs(page_size=5)] == [f"j{number}" for number in range(12)]
    assert servicer.page_tokens[-3:] == ["", "5", "10"]
    assert client.list(0) == []

"""What the advisor reads from the gateway's JobService: job reports and the frames still to do."""

from __future__ import annotations

import json
from typing import Any

import grpc

from services.common.errors import FailedPrecondition, InvalidArgument, from_rpc_error
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc

# Jobs whose frames still have to pass through workers.
_UNFINISHED_STATES = (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)
# The deepest a queue is read for the gauges; beyond it the replica caps bind anyway.
_PENDING_JOB_LIMIT = 10_000
_CALL_TIMEOUT_SECONDS = 10.0


def _report_of(job: jobs_pb2.Job) -> dict[str, Any]:
    if not job.report_json:
        state = jobs_pb2.JobState.Name(job.state)
        raise FailedPrecondition(f"job {job.id} has no report yet (state {state}); it ends with one")
    try:
        report = json.loads(job.report_json)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"job {job.id}'s report is not valid JSON: {error}") from None
    if not isinstance(report, dict):
        raise InvalidArgument(f"job {job.id}'s report is not a JSON object")
    return report


class GatewayJobs:
    def __init__(self, stub: jobs_pb2_grpc.JobServiceStub) -> None:
        self._stub = stub

    async def _list(self, limit: int, state: jobs_pb2.JobState) -> list[jobs_pb2.Job]:
        try:
            response = await self._stub.ListJobs(
                jobs_pb2.ListJobsRequest(limit=limit, state=state), timeout=_CALL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return list(response.jobs)

    async def report(self, job_id: str) -> dict[str, Any]:
        if not job_id:
            raise InvalidArgument("job_id must not be empty")
        try:
            job = await self._stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=_CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _report_of(job)

    async def succeeded_reports(self, limit: int) -> tuple[list[dict[str, Any]], list[str]]:
        """Reports of the newest succeeded jobs, and a reason for each job whose report cannot be read."""
        reports: list[dict[str, Any]] = []
        skipped: list[str] = []
        for job in await self._list(limit, jobs_pb2.JOB_STATE_SUCCEEDED):
            try:
                reports.append(_report_of(job))
            except (FailedPrecondition, InvalidArgument) as error:
                skipped.append(f"job {job.id}: {error.message}")
        return reports, skipped

    async def pending_frames(self) -> int:
        jobs = [job for state in _UNFINISHED_STATES for job in await self._list(_PENDING_JOB_LIMIT, state)]
        return sum(max(job.frames_total - job.frames_done, 0) for job in jobs)

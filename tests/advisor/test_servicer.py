"""The AdvisorService over real gRPC in-process, fed by a small stand-in for the gateway's JobService."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest

from services.advisor.advisor_state import AdvisorState
from services.advisor.fleet_report import build_fleet_report
from services.advisor.gateway_jobs import GatewayJobs
from services.advisor.job_profile import JobProfile, profile_from_report
from services.advisor.scaling_loop import refresh_scaling
from services.advisor.servicer import SERVICE_NAME, AdvisorServicer, fleet_report_to_proto, profile_to_proto
from services.advisor.settings import AdvisorSettings
from services.common.errors import NotFound
from services.common.gpu_catalog import GIB
from services.common.grpc_channel import PLAINTEXT, open_channel
from services.common.grpc_server import ServiceBinding, start_server
from services.common.server_settings import ServerSettings
from swapline.advisor.v1 import advisor_pb2, advisor_pb2_grpc
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from tests.advisor.recorded_reports import catalog_of, gpu_entry, job_report, measured_calibration

CATALOG = catalog_of(gpu_entry("Big", 80, 4.0), gpu_entry("Cheap", 24, 0.4), gpu_entry("Small", 8, 0.1))
CALIBRATION = measured_calibration("Big", {"Cheap": 3.0, "Small": 4.0})


def _job(
    report: dict[str, Any] | None, job_id: str, state: jobs_pb2.JobState, total: int = 0, done: int = 0
) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=job_id,
        state=state,
        frames_total=total,
        frames_done=done,
        report_json=json.dumps(report) if report else "",
    )


class FakeJobService(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: list[jobs_pb2.Job]) -> None:
        self.jobs = jobs

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        for job in self.jobs:
            if job.id == request.job_id:
                return job
        raise NotFound(f"job {request.job_id} does not exist")

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        chosen = [job for job in self.jobs if request.state in (0, job.state)]
        return jobs_pb2.ListJobsResponse(jobs=chosen[: request.limit or 50])


JOBS = [
    _job(job_report("small", memory_peak_bytes=4 * GIB), "small", jobs_pb2.JOB_STATE_SUCCEEDED, 250, 250),
    _job(job_report("wide", memory_peak_bytes=20 * GIB), "wide", jobs_pb2.JOB_STATE_SUCCEEDED, 250, 250),
    _job(job_report("broken", frames=-3), "broken", jobs_pb2.JOB_STATE_SUCCEEDED, 250, 250),
    _job(None, "queued", jobs_pb2.JOB_STATE_QUEUED, 1000, 0),
    _job(None, "running", jobs_pb2.JOB_STATE_RUNNING, 1000, 400),
]

# The scenario gets a stub of the advisor, its state and its address.
Scenario = Callable[[advisor_pb2_grpc.AdvisorServiceStub, AdvisorState, str], Awaitable[None]]


def _run(scenario: Scenario) -> None:
    async def main() -> None:
        fake = ServiceBinding(
            FakeJobService(JOBS),
            jobs_pb2_grpc.add_JobServiceServicer_to_server,
            "swapline.jobs.v1.JobService",
        )
        gateway = await start_server(ServerSettings(transport_security="plaintext", auth_mode="open"), [fake])
        gateway_channel = open_channel(f"127.0.0.1:{gateway.port}", PLAINTEXT)
        settings = AdvisorSettings(
            gateway_target=f"127.0.0.1:{gateway.port}",
            target_chunk_seconds=10.0,
            transport_security="plaintext",
            auth_mode="open",
        )
        jobs = GatewayJobs(jobs_pb2_grpc.JobServiceStub(gateway_channel))
        state = AdvisorState(settings, CATALOG, CALIBRATION, jobs)
        binding = ServiceBinding(
            AdvisorServicer(state), advisor_pb2_grpc.add_AdvisorServiceServicer_to_server, SERVICE_NAME
        )
        advisor = await start_server(settings, [binding])
        channel = open_channel(f"127.0.0.1:{advisor.port}", PLAINTEXT)
        try:
            await scenario(advisor_pb2_grpc.AdvisorServiceStub(channel), state, f"127.0.0.1:{advisor.port}")
        finally:
            await channel.close()
            await gateway_channel.close()
            await advisor.server.stop(None)
            await gateway.server.stop(None)

    asyncio.run(main())


def test_recommend_for_job_fetches_the_report_from_the_gateway() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        answer = await stub.RecommendForJob(advisor_pb2.RecommendForJobRequest(job_id="wide", deadline_seconds=60))

        assert answer.job_id == "wide"
        assert answer.profile.memory_peak_bytes == 20 * GIB
        assert answer.recommended_gpu == "Cheap"  # Small (8 GiB) cannot hold 23 GiB
        assert answer.reason.startswith("Cheap: fits (20.0 of 24.0 GiB with 15% headroom)")
        assert {option.gpu: option.fits for option in answer.options} == {
            "Big": True,
            "Cheap": True,
            "Small": False,
        }

    _run(scenario)


def test_an_unknown_job_is_not_found_and_a_bad_report_is_invalid() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.RecommendForJob(advisor_pb2.RecommendForJobRequest(job_id="nope"))
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stub.RecommendForJob(advisor_pb2.RecommendForJobRequest(job_id="broken"))
        with pytest.raises(grpc.aio.AioRpcError) as unfinished:
            await stub.RecommendForJob(advisor_pb2.RecommendForJobRequest(job_id="queued"))

        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "job nope does not exist" in (missing.value.details() or "")
        assert broken.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "profile field 'frames' must be a positive integer, got -3" in (broken.value.details() or "")
        assert unfinished.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    _run(scenario)


def test_recommend_for_profile_round_trips_the_profile_and_checks_it() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        profile = profile_to_proto(profile_from_report(job_report("p", memory_peak_bytes=4 * GIB)))
        answer = await stub.RecommendForProfile(advisor_pb2.RecommendForProfileRequest(profile=profile))
        profile.frames = 0
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.RecommendForProfile(advisor_pb2.RecommendForProfileRequest(profile=profile))

        assert answer.profile.job_id == "p"
        assert answer.recommended_gpu == "Small"
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "profile field 'frames'" in (bad.value.details() or "")

    _run(scenario)


def test_recommend_for_report_reads_the_report_it_is_given() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        report = json.dumps(job_report("fresh", memory_peak_bytes=20 * GIB))
        answer = await stub.RecommendForReport(advisor_pb2.RecommendForReportRequest(report_json=report))
        with pytest.raises(grpc.aio.AioRpcError) as not_json:
            await stub.RecommendForReport(advisor_pb2.RecommendForReportRequest(report_json="{truncated"))
        with pytest.raises(grpc.aio.AioRpcError) as not_object:
            await stub.RecommendForReport(advisor_pb2.RecommendForReportRequest(report_json="[1, 2]"))

        assert answer.job_id == "fresh" and answer.recommended_gpu == "Cheap"
        assert not_json.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "report_json is not JSON" in (not_json.value.details() or "")
        assert not_object.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    _run(scenario)


def test_fleet_report_covers_the_succeeded_jobs_and_names_the_skipped() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        answer = await stub.FleetReport(advisor_pb2.FleetReportRequest(limit=10))

        assert answer.jobs == 2
        assert answer.jobs_compared == 2
        assert [entry.split(":")[0] for entry in answer.skipped] == ["job broken"]
        rows = {row.gpu: row for row in answer.rows}
        assert (rows["Big"].jobs_fitting, rows["Cheap"].jobs_fitting, rows["Small"].jobs_fitting) == (2, 2, 1)
        assert answer.as_run_cost_usd == pytest.approx(2 * 4.0 * 20.0 / 3600)
        assert answer.recommended_cost_usd == pytest.approx(0.1 * 57.5 / 3600 + 0.4 * 45.0 / 3600)
        # The advisor's calibration has no two-GPU point: each option says so and predicts nothing.
        assert [(option.gpu, option.gpu_count, option.jobs_fitting) for option in answer.multi_gpu] == [
            ("Big", 2, 2),
            ("Cheap", 2, 2),
            ("Small", 2, 1),
        ]
        assert not any(option.measured or option.predicted_seconds or option.cost_usd for option in answer.multi_gpu)
        assert answer.multi_gpu[1].reason.startswith("2 x Cheap: no 2-GPU measurement in the calibration")

    _run(scenario)


def _fleet_profiles() -> list[JobProfile]:
    # 250 frames, 20 s on Big: 45 s on Cheap, 57.5 s on Small; "wide" (20 GiB) does not fit Small.
    return [
        profile_from_report(job_report("small", memory_peak_bytes=4 * GIB)),
        profile_from_report(job_report("wide", memory_peak_bytes=20 * GIB)),
    ]


def test_measured_multi_gpu_options_convert_with_their_figures_and_comparison() -> None:
    calibration = replace(CALIBRATION, gpu_scaling={2: 1.8})
    report = build_fleet_report(_fleet_profiles(), CATALOG, calibration, 0.15)

    options = {option.gpu: option for option in fleet_report_to_proto(report).multi_gpu}

    cheap = options["Cheap"]
    assert (cheap.gpu_count, cheap.jobs_fitting, cheap.measured, cheap.single_gpu, cheap.recommended) == (
        2,
        2,
        True,
        "Big",
        True,
    )
    assert cheap.scaling == pytest.approx(1.8)
    assert cheap.predicted_seconds == pytest.approx(90.0 / 1.8)
    assert cheap.cost_usd == pytest.approx(2 * 0.4 * 50.0 / 3600)
    assert cheap.single_gpu_cost_usd == pytest.approx(4.0 * 40.0 / 3600)
    assert cheap.reason == report.multi_gpu[1].reason
    # Two of the fastest GPU: no single GPU is as fast, so nothing to compare with and no cost of one.
    big = options["Big"]
    assert (big.measured, big.single_gpu, big.single_gpu_cost_usd, big.recommended) == (True, "", 0.0, True)
    assert big.predicted_seconds == pytest.approx(40.0 / 1.8)


def test_unmeasured_multi_gpu_options_convert_as_not_measured() -> None:
    report = build_fleet_report(_fleet_profiles(), CATALOG, CALIBRATION, 0.15)

    small = {option.gpu: option for option in fleet_report_to_proto(report).multi_gpu}["Small"]

    assert (small.gpu_count, small.jobs_fitting, small.measured, small.recommended) == (2, 1, False, False)
    assert (small.scaling, small.predicted_seconds, small.cost_usd, small.single_gpu_cost_usd) == (0.0, 0.0, 0.0, 0.0)
    assert small.single_gpu == ""


def test_get_catalog_and_the_scaling_refresh() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        catalog = await stub.GetCatalog(advisor_pb2.GetCatalogRequest())
        signals = await refresh_scaling(state)

        assert [gpu.name for gpu in catalog.gpus] == ["Big", "Cheap", "Small"]
        assert catalog.gpus[0].sources["price_per_hour_usd"] == "test price list"
        # 1000 queued + 600 running frames; no chunk events, so the slowest stage (30 ms) gives 33.3 fps.
        assert signals.pending_frames == 1600
        assert signals.per_worker_fps == pytest.approx(1000.0 / 30.0)
        assert signals.desired_workers == 5  # ceil(1600 / (33.3 * 10 s))

    _run(scenario)

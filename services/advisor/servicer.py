"""AdvisorService: GPU recommendations per job and per profile, the fleet report and the catalog."""

from __future__ import annotations

import json

import grpc

from services.advisor.advisor_state import AdvisorState
from services.advisor.cluster_inventory import ClusterInventory
from services.advisor.fleet_report import FleetReport, MultiGpuOption, build_fleet_report
from services.advisor.gpu_recommender import Recommendation, recommend_gpu
from services.advisor.job_profile import (
    JobProfile,
    profile_from_report,
    profiles_from_reports,
    validate_profile,
)
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import GpuCatalog
from services.common.job_vocabulary import STAGE_NAMES
from swapline.advisor.v1 import advisor_pb2, advisor_pb2_grpc

SERVICE_NAME = advisor_pb2.DESCRIPTOR.services_by_name["AdvisorService"].full_name


def profile_to_proto(profile: JobProfile) -> advisor_pb2.JobProfile:
    return advisor_pb2.JobProfile(
        job_id=profile.job_id,
        gpu_model=profile.gpu_model,
        memory_peak_bytes=profile.memory_peak_bytes,
        memory_p95_bytes=profile.memory_p95_bytes,
        utilization_mean=profile.utilization_mean,
        stage_ms_per_frame=advisor_pb2.StageMsPerFrame(**dict(profile.stage_ms_per_frame)),
        width=profile.width,
        height=profile.height,
        faces_per_frame=profile.faces_per_frame,
        frames=profile.frames,
        wall_seconds=profile.wall_seconds,
    )


def profile_from_proto(message: advisor_pb2.JobProfile) -> JobProfile:
    stages = message.stage_ms_per_frame
    return validate_profile(
        JobProfile(
            job_id=message.job_id,
            gpu_model=message.gpu_model,
            memory_peak_bytes=message.memory_peak_bytes,
            memory_p95_bytes=message.memory_p95_bytes,
            utilization_mean=message.utilization_mean,
            stage_ms_per_frame={stage: getattr(stages, stage) for stage in STAGE_NAMES},
            width=message.width,
            height=message.height,
            faces_per_frame=message.faces_per_frame,
            frames=message.frames,
            wall_seconds=message.wall_seconds,
        )
    )


def cluster_to_proto(inventory: ClusterInventory) -> advisor_pb2.ClusterInventory | None:
    """None (the field left unset) where the advisor does not read the cluster: job reports stay as they were."""
    if not inventory.enabled:
        return None
    return advisor_pb2.ClusterInventory(
        enabled=inventory.enabled,
        gpus=[
            advisor_pb2.ClusterGpus(
                product=group.product,
                catalog_gpu=group.catalog_gpu,
                nodes=group.nodes,
                capacity=group.capacity,
                allocatable=group.allocatable,
                summary=group.summary,
            )
            for group in inventory.gpus
        ],
        read_at_unix_seconds=inventory.read_at,
        error=inventory.error,
    )


def recommendation_to_proto(recommendation: Recommendation) -> advisor_pb2.Recommendation:
    return advisor_pb2.Recommendation(
        job_id=recommendation.profile.job_id,
        profile=profile_to_proto(recommendation.profile),
        options=[
            advisor_pb2.GpuOption(
                gpu=option.gpu.name,
                predicted_seconds=option.predicted_seconds,
                cost_usd=option.cost_usd,
                fits=option.fits,
                memory_needed_bytes=option.memory_needed_bytes,
                memory_bytes=option.gpu.memory_bytes,
                meets_deadline=option.meets_deadline,
                calibrated=option.calibrated,
                cluster_gpus=option.cluster_gpus,
            )
            for option in recommendation.options
        ],
        recommended_gpu=recommendation.recommended.gpu.name if recommendation.recommended else "",
        reason=recommendation.reason,
        deadline_seconds=recommendation.deadline_seconds or 0.0,
        recommended_gpu_in_cluster=recommendation.recommended_in_cluster,
        cluster=cluster_to_proto(recommendation.cluster),
    )


def multi_gpu_option_to_proto(option: MultiGpuOption) -> advisor_pb2.MultiGpuOption:
    """An option without a measured scaling predicts nothing: measured false and its figures 0."""
    return advisor_pb2.MultiGpuOption(
        gpu=option.gpu,
        gpu_count=option.gpu_count,
        jobs_fitting=option.jobs_fitting,
        measured=option.scaling is not None,
        scaling=option.scaling or 0.0,
        predicted_seconds=option.predicted_seconds or 0.0,
        cost_usd=option.cost_usd or 0.0,
        single_gpu=option.single_gpu,
        single_gpu_cost_usd=option.single_gpu_cost_usd or 0.0,
        recommended=option.recommended,
        reason=option.reason,
    )


def fleet_report_to_proto(report: FleetReport) -> advisor_pb2.FleetReportResponse:
    return advisor_pb2.FleetReportResponse(
        jobs=report.jobs,
        rows=[
            advisor_pb2.FleetGpuRow(
                gpu=row.gpu,
                jobs_fitting=row.jobs_fitting,
                fit_share=row.fit_share,
                mean_predicted_seconds=row.mean_predicted_seconds,
                recommended_cost_usd=row.recommended_cost_usd,
                jobs_recommended=row.jobs_recommended,
                as_run_cost_usd=row.as_run_cost_usd,
                jobs_run=row.jobs_run,
                cluster_gpus=row.cluster_gpus,
            )
            for row in report.rows
        ],
        as_run_cost_usd=report.as_run_cost_usd,
        recommended_cost_usd=report.recommended_cost_usd,
        savings_percent=report.savings_percent,
        jobs_compared=report.jobs_compared,
        jobs_unpriced=report.jobs_unpriced,
        jobs_without_recommendation=report.jobs_without_recommendation,
        skipped=list(report.skipped),
        cluster=cluster_to_proto(report.cluster),
        multi_gpu=[multi_gpu_option_to_proto(option) for option in report.multi_gpu],
    )


def catalog_to_proto(catalog: GpuCatalog) -> advisor_pb2.GpuCatalog:
    return advisor_pb2.GpuCatalog(
        gpus=[
            advisor_pb2.GpuSpec(
                name=gpu.name,
                nvml_names=list(gpu.nvml_names),
                memory_bytes=gpu.memory_bytes,
                fp16_tensor_tflops=gpu.fp16_tensor_tflops,
                memory_bandwidth_gbps=gpu.memory_bandwidth_gbps,
                video_decoders=gpu.video_decoders,
                price_per_hour_usd=gpu.price_per_hour_usd,
                sources=dict(gpu.sources),
            )
            for gpu in catalog.gpus
        ]
    )


class AdvisorServicer(advisor_pb2_grpc.AdvisorServiceServicer):
    def __init__(self, state: AdvisorState) -> None:
        self._state = state

    def _recommend(self, profile: JobProfile, deadline_seconds: float) -> advisor_pb2.Recommendation:
        state = self._state
        recommendation = recommend_gpu(
            profile,
            state.catalog,
            state.calibration,
            state.settings.headroom_fraction,
            deadline_seconds,
            state.cluster.inventory,
        )
        return recommendation_to_proto(recommendation)

    async def RecommendForJob(
        self, request: advisor_pb2.RecommendForJobRequest, context: grpc.aio.ServicerContext
    ) -> advisor_pb2.Recommendation:
        report = await self._state.jobs.report(request.job_id)
        return self._recommend(profile_from_report(report), request.deadline_seconds)

    async def RecommendForProfile(
        self, request: advisor_pb2.RecommendForProfileRequest, context: grpc.aio.ServicerContext
    ) -> advisor_pb2.Recommendation:
        return self._recommend(profile_from_proto(request.profile), request.deadline_seconds)

    async def RecommendForReport(
        self, request: advisor_pb2.RecommendForReportRequest, context: grpc.aio.ServicerContext
    ) -> advisor_pb2.Recommendation:
        try:
            report = json.loads(request.report_json)
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"report_json is not JSON: {error}") from None
        if not isinstance(report, dict):
            raise InvalidArgument("report_json must hold a JSON object")
        return self._recommend(profile_from_report(report), request.deadline_seconds)

    async def FleetReport(
        self, request: advisor_pb2.FleetReportRequest, context: grpc.aio.ServicerContext
    ) -> advisor_pb2.FleetReportResponse:
        state = self._state
        reports, unreadable = await state.jobs.succeeded_reports(state.job_limit(request.limit))
        profiles, malformed = profiles_from_reports(reports)
        report = build_fleet_report(
            profiles,
            state.catalog,
            state.calibration,
            state.settings.headroom_fraction,
            request.deadline_seconds,
            [*unreadable, *malformed],
            state.cluster.inventory,
        )
        return fleet_report_to_proto(report)

    async def GetCatalog(
        self, request: advisor_pb2.GetCatalogRequest, context: grpc.aio.ServicerContext
    ) -> advisor_pb2.GpuCatalog:
        return catalog_to_proto(self._state.catalog)

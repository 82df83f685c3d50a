"""Recomputes the autoscaling gauges from the gateway's jobs every refresh_seconds."""

from __future__ import annotations

import asyncio
import logging

from services.advisor.advisor_state import AdvisorState
from services.advisor.job_profile import profiles_from_reports
from services.advisor.scaling_signals import (
    ScalingSignals,
    compute_signals,
    gpu_busy_seconds_per_frame,
    median_worker_fps,
    per_worker_fps_of_profile,
    per_worker_fps_of_report,
    publish_signals,
)
from services.common.errors import SwaplineError

log = logging.getLogger(__name__)


async def refresh_scaling(state: AdvisorState) -> ScalingSignals:
    settings = state.settings
    reports, _ = await state.jobs.succeeded_reports(settings.default_job_limit)
    profiles, _ = profiles_from_reports(reports)
    by_job = {profile.job_id: profile for profile in profiles}
    rates = []
    for report in reports:
        rate = per_worker_fps_of_report(report)
        profile = by_job.get(str(report.get("job_id")))
        if rate is None and profile is not None:
            rate = per_worker_fps_of_profile(profile)
        rates.append(rate)
    signals = compute_signals(
        pending_frames=await state.jobs.pending_frames(),
        per_worker_fps=median_worker_fps(rates, settings.default_worker_fps),
        gpu_busy_per_frame=gpu_busy_seconds_per_frame(profiles),
        target_seconds=settings.target_chunk_seconds,
        target_gpu_utilization=settings.target_gpu_utilization,
        max_workers=settings.max_worker_replicas,
        max_triton=settings.max_triton_replicas,
    )
    publish_signals(signals)
    return signals


async def refresh_scaling_forever(state: AdvisorState) -> None:
    """A gateway outage leaves the last gauges in place and is logged; the loop keeps going."""
    while True:
        try:
            signals = await refresh_scaling(state)
            log.debug("scaling signals %s", signals)
        except SwaplineError as error:
            log.warning("could not refresh the scaling signals: %s", error.message)
        await asyncio.sleep(state.settings.refresh_seconds)

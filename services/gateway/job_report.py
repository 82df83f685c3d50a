"""The job report: what was processed, how fast each stage ran, and what looked wrong."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from services.common.job_vocabulary import STAGE_NAMES
from services.gateway.gpu_trend_source import TrendRow
from services.gateway.job_records import (
    ChunkRecord,
    ChunkStats,
    JobRecord,
)
from services.gateway.tenant_areas import tenant_view

EventKind = Literal["chunk_start", "chunk_end", "faces_changed"]
# Events at the same instant read in this order: a chunk starts, its faces change, it ends.
_EVENT_ORDER: dict[EventKind, int] = {"chunk_start": 0, "faces_changed": 1, "chunk_end": 2}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _stage_summary(frames: int, seconds: float) -> dict[str, float]:
    return {
        "seconds": round(seconds, 4),
        "ms_per_frame": round(_ratio(seconds * 1000.0, frames), 4),
        "fps": round(_ratio(frames, seconds), 4),
    }


def real_face_count_changes(measured: Sequence[tuple[ChunkRecord, ChunkStats]]) -> set[tuple[int, int]]:
    """(frame, faces) of the changes that change something.

    Each worker lists the first frame of its chunk, since it cannot see the frame before; in frame
    order over all chunks, a change that repeats the count already in force is no change.
    """
    ordered = sorted((change.frame_index, change.faces) for _, stats in measured for change in stats.face_count_changes)
    kept: set[tuple[int, int]] = set()
    current: int | None = None
    for frame, faces in ordered:
        if faces != current:
            kept.add((frame, faces))
            current = faces
    return kept


def _chunk_events(
    chunk: ChunkRecord, stats: ChunkStats, origin: float, changes: set[tuple[int, int]]
) -> list[dict[str, Any]]:
    """Face-count changes carry a frame, not a time; they are placed in proportion within the chunk's run."""
    started, finished = stats.started_at_unix - origin, stats.finished_at_unix - origin
    span = max(finished - started, 0.0)
    events: list[dict[str, Any]] = [
        {"t": started, "kind": "chunk_start", "chunk": chunk.index, "frame": chunk.start_frame, "faces": None}
    ]
    for change in stats.face_count_changes:
        if (change.frame_index, change.faces) not in changes:
            continue
        offset = min(max(change.frame_index - chunk.start_frame, 0), max(stats.frames, 1))
        events.append(
            {
                "t": started + span * _ratio(offset, stats.frames),
                "kind": "faces_changed",
                "chunk": chunk.index,
                "frame": change.frame_index,
                "faces": change.faces,
            }
        )
    events.append(
        {
            "t": finished,
            "kind": "chunk_end",
            "chunk": chunk.index,
            "frame": chunk.start_frame + stats.frames,
            "faces": stats.faces,
        }
    )
    return events


def build_report(job: JobRecord, chunks: Sequence[ChunkRecord]) -> dict[str, Any]:
    """A pure summary of the job, its probed target and its chunks' stats; times count from the job start."""
    measured = [(chunk, chunk.stats) for chunk in sorted(chunks, key=lambda c: c.index) if chunk.stats is not None]
    frames = sum(stats.frames for _, stats in measured)
    faces = sum(stats.faces for _, stats in measured)
    frames_with_faces = sum(stats.frames_with_faces for _, stats in measured)
    fp32_fallbacks = sum(stats.fp32_fallbacks for _, stats in measured)
    origin = job.started_at if job.started_at is not None else job.created_at
    wall_seconds = job.finished_at - origin if job.finished_at is not None else 0.0

    stages: dict[str, Any] = {
        stage: _stage_summary(frames, sum(stats.stage_seconds.get(stage, 0.0) for _, stats in measured))
        for stage in STAGE_NAMES
    }
    stages["join"] = {"seconds": round(job.join.join_seconds if job.join else 0.0, 4)}

    changes = real_face_count_changes(measured)
    events = [event for chunk, stats in measured for event in _chunk_events(chunk, stats, origin, changes)]
    events.sort(key=lambda event: (event["t"], _EVENT_ORDER[event["kind"]], event["chunk"], event["frame"]))
    for event in events:
        event["t"] = round(event["t"], 4)

    warnings = [f"chunk {chunk.index}: {warning}" for chunk, stats in measured for warning in stats.warnings]
    if frames > 0 and faces == 0:
        warnings.append(f"no face was found in any of the {frames} frames; the output shows the target unchanged")
    elif frames_with_faces < frames:
        warnings.append(f"{frames - frames_with_faces} of {frames} frames had no face and were left unchanged")
    if fp32_fallbacks:
        warnings.append(f"{fp32_fallbacks} swapper requests overflowed in FP16 (NaN or Inf) and were run again in FP32")
    attempts = sum(chunk.attempts for chunk in chunks)
    if attempts > len(chunks):
        warnings.append(f"{attempts - len(chunks)} chunk attempts failed or lapsed and were retried")
    target = job.target
    if job.join is not None and target is not None and target.has_audio and not job.join.audio_copied:
        warnings.append("the target has audio but it was not copied into the output")

    return {
        "job_id": job.id,
        "state": job.state,
        "selector": job.selector,
        "swapper": job.models.swapper,
        "detector": job.models.detector,
        "target": None
        if target is None
        else {
            "uri": tenant_view(job.tenant, job.target_uri),
            "width": target.width,
            "height": target.height,
            "fps": target.fps,
            "frames": target.frame_count,
            "duration_seconds": target.duration_seconds,
            "has_audio": target.has_audio,
        },
        "output": {
            "uri": job.join.output_uri if job.join else "",
            "frames": job.join.frames if job.join else 0,
            "audio_copied": job.join.audio_copied if job.join else False,
        },
        "frames": frames,
        "faces": faces,
        "frames_with_faces": frames_with_faces,
        "fp32_fallbacks": fp32_fallbacks,
        "chunks": len(chunks),
        "chunk_attempts": attempts,
        "wall_seconds": round(wall_seconds, 4),
        "fps": round(_ratio(frames, wall_seconds), 4),
        "stages": stages,
        "events": events,
        "warnings": warnings,
        "error": None if job.error is None else {"code": job.error.code, "message": job.error.message},
    }


def _known(values: Sequence[float]) -> list[float]:
    return [value for value in values if not math.isnan(value)]


def _statistic(values: Sequence[float], kind: Literal["mean", "peak", "p95"]) -> float | None:
    """None when the source had no reading; p95 interpolates linearly between ranks."""
    known = _known(values)
    if not known:
        return None
    if kind == "mean":
        return round(sum(known) / len(known), 4)
    if kind == "peak":
        return round(max(known), 4)
    return round(float(np.percentile(known, 95)), 4)


def _whole_bytes(value: float | None) -> int | None:
    return None if value is None else round(value)


def gpu_statistics(rows: Sequence[TrendRow]) -> list[dict[str, Any]]:
    """Per GPU over the job's window: what the advisor sizes GPUs from."""
    grouped: dict[tuple[str, int, str], list[TrendRow]] = {}
    for row in sorted(rows, key=lambda row: (row.node, row.gpu_index, row.gpu_uuid, row.timestamp)):
        grouped.setdefault((row.node, row.gpu_index, row.gpu_uuid), []).append(row)
    summaries = []
    for (node, index, uuid), series in grouped.items():
        utilization = [row.utilization_percent for row in series]
        decoder = [row.decoder_utilization_percent for row in series]
        encoder = [row.encoder_utilization_percent for row in series]
        memory_used = [row.memory_used_bytes for row in series]
        memory_total = _statistic([row.memory_total_bytes for row in series], "peak")
        summaries.append(
            {
                "node": node,
                "index": index,
                "uuid": uuid,
                "model": series[-1].gpu_model,
                "samples": len(series),
                "utilization_mean_percent": _statistic(utilization, "mean"),
                "utilization_peak_percent": _statistic(utilization, "peak"),
                "utilization_p95_percent": _statistic(utilization, "p95"),
                # NVDEC and NVENC; null where the GPU has no such engine or cannot report it.
                "decoder_utilization_mean_percent": _statistic(decoder, "mean"),
                "decoder_utilization_peak_percent": _statistic(decoder, "peak"),
                "encoder_utilization_mean_percent": _statistic(encoder, "mean"),
                "encoder_utilization_peak_percent": _statistic(encoder, "peak"),
                "memory_used_peak_bytes": _whole_bytes(_statistic(memory_used, "peak")),
                "memory_used_p95_bytes": _whole_bytes(_statistic(memory_used, "p95")),
                "memory_total_bytes": _whole_bytes(memory_total),
                "temperature_peak_celsius": _statistic([row.temperature_celsius for row in series], "peak"),
                "power_mean_watts": _statistic([row.power_watts for row in series], "mean"),
            }
        )
    return summaries


def gpu_section(
    rows: Sequence[TrendRow], source: str, window: tuple[float, float], charts: Mapping[str, str]
) -> dict[str, Any]:
    return {
        "source": source,
        "window": {"start_unix": round(window[0], 3), "end_unix": round(window[1], 3)},
        "samples": len(rows),
        "gpus": gpu_statistics(rows),
        "charts": dict(charts),
    }


def with_gpu_trend(report: Mapping[str, Any], section: Mapping[str, Any], warnings: Sequence[str]) -> dict[str, Any]:
    return {**report, "gpu": dict(section), "warnings": [*report["warnings"], *warnings]}


def with_recommendation(
    report: Mapping[str, Any], section: Mapping[str, Any] | None, warnings: Sequence[str]
) -> dict[str, Any]:
    extra = {} if section is None else {"recommendation": dict(section)}
    return {**report, **extra, "warnings": [*report["warnings"], *warnings]}


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)

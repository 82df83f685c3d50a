"""The batch report: each pair's outcome (done, failed and why, skipped and why) and the batch's totals."""

from __future__ import annotations

from typing import Any

from services.gateway.batch_progress import BatchProgress
from services.gateway.job_records import JobRecord
from services.gateway.tenant_areas import tenant_view

REPORT_VERSION = 1


def batch_report_uri(batch_id: str) -> str:
    return f"outputs/{batch_id}/batch_report.json"


def _job_seconds(job: JobRecord) -> float:
    if job.started_at is None or job.finished_at is None:
        return 0.0
    return max(job.finished_at - job.started_at, 0.0)


def build_batch_report(progress: BatchProgress) -> dict[str, Any]:
    batch = progress.batch
    entries: list[dict[str, Any]] = []
    for entry in batch.entries:
        row: dict[str, Any] = {
            "target": batch.target_names[entry.target_index],
            "source": batch.source_names[entry.source_index],
            "job_id": entry.job_id,
        }
        job = progress.jobs.get(entry.job_id)
        if not entry.job_id:
            row |= {"state": "SKIPPED", "reason": entry.skip_reason}
        elif job is None:
            row |= {"state": "DELETED", "reason": "retention deleted the job"}
        else:
            seconds = _job_seconds(job)
            row |= {
                "state": job.state,
                "frames": job.frames_done,
                "seconds": round(seconds, 3),
                "fps": round(job.frames_done / seconds, 3) if seconds > 0 else 0.0,
                "output_uri": tenant_view(job.tenant, job.join.output_uri if job.join else job.output_uri)
                if job.state == "SUCCEEDED"
                else "",
                "reason": job.error.message if job.error else "",
            }
        entries.append(row)
    window = None
    if progress.started_at is not None and progress.finished_at is not None:
        window = {"started_at": progress.started_at, "finished_at": progress.finished_at}
    return {
        "version": REPORT_VERSION,
        "batch_id": batch.id,
        "name": batch.name,
        "state": progress.state,
        "created_at": batch.created_at,
        "cancelled_at": batch.cancelled_at,
        "window": window,
        "counts": {
            "jobs": progress.counts.jobs_total,
            "succeeded": progress.counts.succeeded,
            "failed": progress.counts.failed,
            "cancelled": progress.counts.cancelled,
            "skipped": progress.counts.skipped,
        },
        "frames": progress.frames_done,
        "fps": round(progress.fps, 3),
        "entries": entries,
        "failed": [row for row in entries if row["state"] == "FAILED"],
        "skipped": [row for row in entries if row["state"] == "SKIPPED"],
        "warnings": [],
    }

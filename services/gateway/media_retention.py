"""Retention of jobs and media: what the gateway stores goes when its time comes, and each tenant's
stored media is held to a size limit.

A sweep, every sweep_interval_seconds:
- deletes the jobs that ended more than their tenant's max_age_seconds ago, with their uploads, outputs,
  reports and work folders (a failed job's segments among them). Only ended jobs are deleted: a queued,
  running or joining job and its files stay however old;
- removes what no stored job owns once untouched for interrupted_seconds: partial uploads and the folders
  of submissions that never reached the store (a gateway stopped in the middle). A younger one may be a
  submission in progress on some gateway, so it stays;
- measures each tenant's stored media (its uploads, and its jobs' work folders and outputs) and records it
  in the store with the tenant's limit, where every gateway's submissions read it: at the limit they are
  refused with RESOURCE_EXHAUSTED. Uploads accepted since the last sweep are counted as they come, so the
  limit is exceeded by no more than what was in flight when it was reached.

A sweep blocks on the file system and the store, so it runs in a thread. Every gateway sharing the media
volume sweeps it; what one removes the others find gone, so sweeps never conflict.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import time
import typing
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import Counter, Gauge

from services.common.tenant_context import LOCAL_TENANT, TENANT_NAME
from services.gateway.job_images import work_area
from services.gateway.job_records import (
    DEFAULT_STORAGE_TENANT,
    ENDED_JOB_STATES,
    BatchSummary,
    JobSummary,
    TenantStorage,
)
from services.gateway.job_store import JobStore
from services.gateway.retention_policy import RetentionPolicy
from services.gateway.tenant_areas import (
    OUTPUTS_FOLDER,
    TENANTS_FOLDER,
    UPLOADS_FOLDER,
    WORK_FOLDER,
    in_tenant_area,
)

log = logging.getLogger(__name__)

# uploads, outputs, work: the folders of deleted jobs; interrupted: what no stored job owned.
RemovedKind = Literal["uploads", "outputs", "work", "interrupted"]
REMOVED_KINDS: tuple[RemovedKind, ...] = typing.get_args(RemovedKind)
DELETE_BATCH = 200

JOBS_DELETED = Counter(
    "swapline_gateway_retention_jobs_deleted_total",
    "Ended jobs deleted past their retention age, by tenant.",
    ["tenant"],
)
BYTES_REMOVED = Counter(
    "swapline_gateway_retention_removed_bytes_total",
    "Media bytes removed by retention, by kind: the uploads, outputs and work folders of deleted jobs, and "
    "interrupted (partial uploads and folders of submissions that never reached the store).",
    ["kind"],
)
TENANT_MEDIA_BYTES = Gauge(
    "swapline_gateway_tenant_media_bytes",
    "Media bytes stored for each tenant at this gateway's last sweep. Every gateway measures the one shared "
    "volume: aggregate replicas with max, not sum.",
    ["tenant"],
)
SWEEP_FAILURES = Counter(
    "swapline_gateway_retention_sweep_failures_total", "Retention sweeps that failed; the next one tries again."
)


@dataclass(frozen=True)
class SweepOutcome:
    deleted_jobs: tuple[str, ...]
    removed_bytes: Mapping[RemovedKind, int]
    storage: tuple[TenantStorage, ...]


@dataclass(frozen=True)
class _Entry:
    """A file or folder directly under one of the gateway's folders, named after the job that owns it."""

    path: Path
    # The tenant whose area holds it (uploads); None where only its job tells (work, outputs).
    area_tenant: str | None


class MediaRetention:
    def __init__(
        self,
        policy: RetentionPolicy,
        store: JobStore,
        media_root: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._store = store
        self._media_root = media_root
        self._clock = clock

    async def sweep_forever(self) -> None:
        """Runs beside the server: a sweep at once, then one every sweep interval."""
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:
                SWEEP_FAILURES.inc()
                log.exception("the retention sweep failed; the next one tries again")
            await asyncio.sleep(self._policy.sweep_interval_seconds)

    def sweep(self) -> SweepOutcome:
        """One sweep, blocking: run it in a thread."""
        now = self._clock()
        jobs = self._store.job_summaries()
        expired = [job for job in jobs if self._expired(job, now)]
        deleted: set[str] = set()
        # In batches: each is one transaction, and other store calls wait for it.
        for start in range(0, len(expired), DELETE_BATCH):
            deleted.update(self._store.delete_ended_jobs([job.id for job in expired[start : start + DELETE_BATCH]]))
        removed: dict[RemovedKind, int] = dict.fromkeys(REMOVED_KINDS, 0)
        for job in expired:
            if job.id in deleted:
                for kind, folder in self._job_folders(job.id, job.tenant):
                    removed[kind] += _remove(folder)
                JOBS_DELETED.labels(job.tenant).inc()
        owners = {job.id: job.tenant for job in jobs if job.id not in deleted}
        # A batch's uploads and report go with it, once retention has deleted every job of it.
        batches = self._store.batch_summaries()
        emptied = [batch for batch in batches if self._batch_expired(batch, now)]
        deleted_batches = set(self._store.delete_emptied_batches([batch.id for batch in emptied]))
        for batch in emptied:
            if batch.id in deleted_batches:
                for kind, folder in self._job_folders(batch.id, batch.tenant):
                    removed[kind] += _remove(folder)
        owners |= {batch.id: batch.tenant for batch in batches if batch.id not in deleted_batches}
        area_tenants = self._area_tenants()
        used: dict[str, int] = defaultdict(int)
        for entry in self._entries(area_tenants):
            size, newest = _measure(entry.path)
            owner = owners.get(entry.path.name)
            if owner is None and newest <= now - self._policy.interrupted_seconds:
                removed["interrupted"] += _remove(entry.path)
                continue
            tenant = entry.area_tenant or owner
            if tenant is not None:
                used[tenant] += size
        for kind, count in removed.items():
            BYTES_REMOVED.labels(kind).inc(count)
        storage = self._record_storage({*area_tenants, *owners.values()}, used)
        return SweepOutcome(tuple(sorted(deleted)), removed, storage)

    def _expired(self, job: JobSummary, now: float) -> bool:
        age = self._policy.limits_of(job.tenant).max_age_seconds
        return (
            job.state in ENDED_JOB_STATES and job.finished_at is not None and age > 0 and job.finished_at <= now - age
        )

    def _batch_expired(self, batch: BatchSummary, now: float) -> bool:
        """No job of the batch is left and it is past its tenant's age: its jobs, created after it, were
        deleted once they had ended that long ago, and a batch that made no job keeps its report that long."""
        age = self._policy.limits_of(batch.tenant).max_age_seconds
        return not batch.has_jobs and age > 0 and batch.created_at <= now - age

    def _job_folders(self, owner_id: str, tenant: str) -> list[tuple[RemovedKind, Path]]:
        """The folders named after a job (or a batch: its uploads and report)."""
        return [
            ("uploads", self._media_root / in_tenant_area(tenant, f"{UPLOADS_FOLDER}/{owner_id}")),
            ("outputs", self._media_root / OUTPUTS_FOLDER / owner_id),
            ("work", self._media_root / work_area(owner_id)),
        ]

    def _area_tenants(self) -> list[str]:
        """The local tenant and every tenant with a folder of its own."""
        tenants_root = self._media_root / TENANTS_FOLDER
        named = sorted(path.name for path in _children(tenants_root) if TENANT_NAME.fullmatch(path.name))
        return [LOCAL_TENANT, *named]

    def _entries(self, area_tenants: Sequence[str]) -> Iterator[_Entry]:
        for tenant in area_tenants:
            for path in _children(self._media_root / in_tenant_area(tenant, UPLOADS_FOLDER)):
                yield _Entry(path, tenant)
        for folder in (WORK_FOLDER, OUTPUTS_FOLDER):
            for path in _children(self._media_root / folder):
                yield _Entry(path, None)

    def _record_storage(self, known: set[str], used: Mapping[str, int]) -> tuple[TenantStorage, ...]:
        """Every tenant known from its folder, its jobs or its own limits gets a row."""
        tenants = {*known, *used, *self._policy.tenants}
        storage = tuple(
            TenantStorage(tenant, used.get(tenant, 0), self._policy.limits_of(tenant).max_bytes)
            for tenant in sorted(tenants)
        )
        self._store.record_storage([*storage, TenantStorage(DEFAULT_STORAGE_TENANT, 0, self._policy.default.max_bytes)])
        for row in storage:
            TENANT_MEDIA_BYTES.labels(row.tenant).set(row.used_bytes)
        return storage


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _measure(path: Path) -> tuple[int, float]:
    """The bytes of the regular files at or under `path` (links are not followed), and the newest
    modification time of anything there. What vanishes meanwhile (another gateway's sweep) counts as nothing."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0, 0.0
    size = info.st_size if stat.S_ISREG(info.st_mode) else 0
    newest = info.st_mtime
    if stat.S_ISDIR(info.st_mode):
        for folder, folders, files in os.walk(path):
            for name in (*folders, *files):
                try:
                    inner = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                newest = max(newest, inner.st_mtime)
                if stat.S_ISREG(inner.st_mode):
                    size += inner.st_size
    return size, newest


def _remove(path: Path) -> int:
    """Removes a file or a folder tree; the bytes it held."""
    size, _ = _measure(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return size

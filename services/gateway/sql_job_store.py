"""What the SQLite and PostgreSQL job stores share: the schema and its migration from earlier versions,
every statement, the row mapping and the method bodies of the job store the gateway uses.

A store supplies its connection handling (transactions, running a statement), its column types and
lock clauses (SqlDialect), and restart recovery, which differs because a PostgreSQL database may be
shared by several gateways. Statements are written with ? placeholders; the PostgreSQL store rewrites
them to %s.

The store's methods block on the database. Async code runs them with `run`, on the store's own thread, so
the event loop never waits on a query; a lock lets calls from any thread take turns on the one connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

from services.common.face_model_catalog import BUILT_IN_DETECTOR, BUILT_IN_SWAPPER, job_models
from services.common.media_info import Keyframe, MediaInfo
from services.common.tenant_context import LOCAL_TENANT
from services.gateway.job_images import reference_image_uri, source_image_uri, write_media_file
from services.gateway.job_paging import JobCursor
from services.gateway.job_records import (
    DEFAULT_STORAGE_TENANT,
    ENDED_JOB_STATES,
    BatchEntry,
    BatchRecord,
    BatchSummary,
    ChunkRecord,
    ChunkState,
    ChunkStats,
    EncodeOptions,
    FaceCountChange,
    JobError,
    JobRecord,
    JobState,
    JobSummary,
    JoinOutcome,
    PlannedChunk,
    RetrySchedule,
    StalledJob,
    TenantStorage,
)
from services.gateway.tenant_chunk_limits import NO_LIMIT, NO_TENANT_CHUNK_LIMITS, TenantChunkLimits

Row = Mapping[str, Any]
ResultT = TypeVar("ResultT")
ArgumentsP = ParamSpec("ArgumentsP")


@dataclass(frozen=True)
class JobChange:
    """A change a gateway made to a job, as the store's change feed delivers it (to every gateway, its own too)."""

    job_id: str
    # Chunks of the job became PENDING (it was submitted, or a chunk was queued again), or a lease of its
    # tenant ended while chunks of the tenant were queued (a tenant limit may have held them back): leases
    # waiting on this gateway look again.
    work_added: bool = False


# Called for each change any gateway makes to a job.
JobChanged = Callable[[JobChange], Awaitable[None]]


@dataclass(frozen=True)
class SqlDialect:
    serial_key: str
    real: str
    integer: str
    # Appended to the query choosing the chunk to lease.
    lease_lock: str
    # Appended to the query of the open chunks of a job being ended; empty: that query is not needed.
    open_chunks_lock: str
    # Run first in the transaction that leases a chunk, where gateways share the store: it holds their leases
    # off until this one commits, so each counts the tenants' leased chunks with the others' leases in them
    # (else two at once could take a tenant past its limit). Empty: the store's transactions already take turns.
    lease_turn: str = ""


_SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS jobs (
    seq {serial_key},
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL DEFAULT '{local_tenant}',
    state TEXT NOT NULL,
    selector TEXT NOT NULL,
    target_uri TEXT NOT NULL,
    output_uri TEXT NOT NULL,
    source_image_uri TEXT NOT NULL DEFAULT '',
    reference_image_uri TEXT NOT NULL DEFAULT '',
    encode_crf {integer} NOT NULL,
    encode_preset TEXT NOT NULL,
    target_json TEXT,
    frames_total {integer} NOT NULL,
    chunks_total {integer} NOT NULL,
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    error_code {integer},
    error_message TEXT,
    join_json TEXT,
    report_json TEXT NOT NULL DEFAULT '',
    stall_started_at {real},
    stalled_before {real} NOT NULL DEFAULT 0,
    swapper TEXT NOT NULL DEFAULT '{built_in_swapper}',
    detector TEXT NOT NULL DEFAULT '{built_in_detector}',
    idempotency_key TEXT,
    payload_fingerprint TEXT NOT NULL DEFAULT '',
    batch_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx {integer} NOT NULL,
    state TEXT NOT NULL,
    start_frame {integer} NOT NULL,
    seek_pts {integer} NOT NULL,
    frame_count {integer} NOT NULL,
    segment_uri TEXT NOT NULL,
    attempts {integer} NOT NULL DEFAULT 0,
    lease_id TEXT NOT NULL DEFAULT '',
    lease_expires_at {real} NOT NULL DEFAULT 0,
    worker_id TEXT NOT NULL DEFAULT '',
    frames_done {integer} NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    faces {integer} NOT NULL DEFAULT 0,
    stats_json TEXT,
    error_code {integer},
    error_message TEXT,
    not_before {real} NOT NULL DEFAULT 0,
    failing_since {real},
    failure_streak {integer} NOT NULL DEFAULT 0,
    progress_at {real} NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS chunks_by_state ON chunks (state);
CREATE INDEX IF NOT EXISTS chunks_by_lease ON chunks (lease_id);
CREATE TABLE IF NOT EXISTS batches (
    seq {serial_key},
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at {real} NOT NULL,
    cancelled_at {real},
    idempotency_key TEXT,
    payload_fingerprint TEXT NOT NULL DEFAULT '',
    spec_json TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS batches_by_idempotency_key ON batches (tenant, idempotency_key);
CREATE TABLE IF NOT EXISTS tenant_storage (
    tenant TEXT PRIMARY KEY,
    used_bytes {integer} NOT NULL,
    max_bytes {integer} NOT NULL
);
"""

# Columns a store created by an earlier version lacks, added when it is opened. Jobs from before tenants
# existed get the default: the local tenant.
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("jobs", "tenant", "TEXT NOT NULL DEFAULT '{local_tenant}'"),
    ("jobs", "source_image_uri", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "reference_image_uri", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "stall_started_at", "{real}"),
    ("jobs", "stalled_before", "{real} NOT NULL DEFAULT 0"),
    ("chunks", "not_before", "{real} NOT NULL DEFAULT 0"),
    ("chunks", "failing_since", "{real}"),
    ("chunks", "failure_streak", "{integer} NOT NULL DEFAULT 0"),
    ("chunks", "progress_at", "{real} NOT NULL DEFAULT 0"),
    # Jobs from before model sets ran the built-in models.
    ("jobs", "swapper", "TEXT NOT NULL DEFAULT '{built_in_swapper}'"),
    ("jobs", "detector", "TEXT NOT NULL DEFAULT '{built_in_detector}'"),
    # Jobs from before idempotency keys hold none (NULL: the unique index below lets any number share it).
    ("jobs", "idempotency_key", "TEXT"),
    ("jobs", "payload_fingerprint", "TEXT NOT NULL DEFAULT ''"),
    # Jobs from before batches belong to none.
    ("jobs", "batch_id", "TEXT NOT NULL DEFAULT ''"),
)
# Earlier versions kept the images in the job table; opening such a store moves them to media storage.
_LEGACY_IMAGE_COLUMNS = ("source_image", "reference_image")
# Made after the columns they index exist, which a migrated store gets only once it is open.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, seq)",
    # One job per tenant and idempotency key, however many submissions race (on any gateway).
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_idempotency_key ON jobs (tenant, idempotency_key)",
    # ListJobs' order and cursor (job_paging.py).
    "CREATE INDEX IF NOT EXISTS jobs_by_created_id ON jobs (created_at, id)",
    "CREATE INDEX IF NOT EXISTS jobs_by_tenant_created_id ON jobs (tenant, created_at, id)",
    "CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (batch_id, created_at, id)",
)


def _dialect_values(dialect: SqlDialect) -> dict[str, str]:
    return {
        "serial_key": dialect.serial_key,
        "real": dialect.real,
        "integer": dialect.integer,
        "local_tenant": LOCAL_TENANT,
        "built_in_swapper": BUILT_IN_SWAPPER,
        "built_in_detector": BUILT_IN_DETECTOR,
    }


def schema_sql(dialect: SqlDialect) -> str:
    """The tables of a new store (CREATE ... IF NOT EXISTS: an existing one is migrated by _migrate)."""
    return _SCHEMA_TEMPLATE.format(**_dialect_values(dialect))


# chunks_done and frames_done come from the chunks; a leased chunk counts the frames its worker reported.
# The casts keep PostgreSQL's SUM (NUMERIC over BIGINT) an integer.
_JOB_COLUMNS = """
    jobs.*,
    CAST((SELECT COUNT(*) FROM chunks c WHERE c.job_id = jobs.id AND c.state = 'DONE') AS BIGINT)
        AS chunks_done,
    CAST((SELECT COALESCE(SUM(CASE WHEN c.state = 'DONE' THEN c.frame_count
                                   WHEN c.state = 'LEASED' AND c.frames_done < c.frame_count
                                       THEN c.frames_done
                                   WHEN c.state = 'LEASED' THEN c.frame_count
                                   ELSE 0 END), 0)
            FROM chunks c WHERE c.job_id = jobs.id) AS BIGINT) AS frames_done
"""
_LIVE_JOB = "j.state IN ('QUEUED', 'RUNNING')"
_HAS_LEASED_CHUNK = "EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = jobs.id AND c.state = 'LEASED')"

# A job whose tenant already has a job with its idempotency key is not inserted (no error: the caller reads
# the holder). A job without a key (NULL) never conflicts.
_INSERT_JOB = """INSERT INTO jobs (id, tenant, state, selector, target_uri, output_uri, source_image_uri,
        reference_image_uri, encode_crf, encode_preset, target_json, frames_total, chunks_total,
        created_at, started_at, finished_at, error_code, error_message, join_json, report_json, swapper, detector,
        idempotency_key, payload_fingerprint, batch_id)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (tenant, idempotency_key) DO NOTHING"""
_JOB_WITH_KEY = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE tenant = ? AND idempotency_key = ?"
# As jobs, a batch whose tenant already has one with its key is not inserted.
_INSERT_BATCH = """INSERT INTO batches (id, tenant, name, created_at, cancelled_at, idempotency_key,
        payload_fingerprint, spec_json)
    VALUES (?, ?, ?, ?, NULL, ?, ?, ?)
    ON CONFLICT (tenant, idempotency_key) DO NOTHING"""
_BATCH_WITH_KEY = "SELECT * FROM batches WHERE tenant = ? AND idempotency_key = ?"
_SELECT_BATCH = "SELECT * FROM batches WHERE id = ?"
_BATCH_JOBS = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE batch_id = ? ORDER BY created_at, id"
_CANCEL_BATCH = "UPDATE batches SET cancelled_at = COALESCE(cancelled_at, ?) WHERE id = ?"
_BATCH_SUMMARIES = """SELECT id, tenant, created_at,
        EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id) AS has_jobs
    FROM batches b ORDER BY seq"""
# Retention deletes a batch once it has deleted all of its jobs.
_DELETE_EMPTIED_BATCH = "DELETE FROM batches WHERE id = ? AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = ?)"
_INSERT_CHUNK = """INSERT INTO chunks (job_id, idx, state, start_frame, seek_pts, frame_count, segment_uri)
    VALUES (?, ?, 'PENDING', ?, ?, ?, ?)"""
_SELECT_JOB = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"
# Newest first, ties in the order stored: the order job_paging's cursor walks.
_LIST_JOBS = f"SELECT {_JOB_COLUMNS} FROM jobs {{where}} ORDER BY created_at DESC, id DESC LIMIT ?"
_BEFORE_CURSOR = "(created_at < ? OR (created_at = ? AND id < ?))"
_LIST_CHUNKS = "SELECT * FROM chunks WHERE job_id = ? ORDER BY idx"
_SELECT_LEASED_CHUNK = "SELECT * FROM chunks WHERE lease_id = ?"
# The chunk to lease: interactive jobs' (submitted alone, not in a batch) before batches', so one large batch
# never holds up a single job; then the tenant holding the fewest leased chunks, so tenants share the workers;
# then the oldest job's first chunk, so a batch's jobs finish in the order submitted. A tenant holding its
# limit of leased chunks ({tenant_limit}: an expression of j.tenant, NO_LIMIT for none) gets none.
_NEXT_PENDING_CHUNK = f"""WITH leased AS (
        SELECT j.tenant, COUNT(*) AS n FROM chunks c JOIN jobs j ON j.id = c.job_id
        WHERE c.state = 'LEASED' AND {_LIVE_JOB} GROUP BY j.tenant)
    SELECT c.job_id, c.idx FROM chunks c JOIN jobs j ON j.id = c.job_id LEFT JOIN leased l ON l.tenant = j.tenant
    WHERE c.state = 'PENDING' AND c.not_before <= ? AND {_LIVE_JOB}
        AND ({{tenant_limit}} = {NO_LIMIT} OR COALESCE(l.n, 0) < {{tenant_limit}})
    ORDER BY CASE WHEN j.batch_id = '' THEN 0 ELSE 1 END, COALESCE(l.n, 0), j.seq, c.idx LIMIT 1"""
# Whether the job's tenant has queued chunks that its limit may be holding back.
_TENANT_HAS_PENDING_CHUNK = f"""SELECT 1 AS pending FROM chunks c JOIN jobs j ON j.id = c.job_id
    WHERE c.state = 'PENDING' AND {_LIVE_JOB} AND j.tenant = (SELECT tenant FROM jobs WHERE id = ?) LIMIT 1"""
_NEXT_DUE = f"""SELECT MIN(c.not_before) AS due FROM chunks c JOIN jobs j ON j.id = c.job_id
    WHERE c.state = 'PENDING' AND c.not_before > ? AND {_LIVE_JOB}"""
_LEASE_CHUNK = """UPDATE chunks SET state = 'LEASED', attempts = attempts + 1, lease_id = ?,
        lease_expires_at = ?, worker_id = ?, frames_done = 0, stage = '', faces = 0, progress_at = ?
    WHERE job_id = ? AND idx = ?"""
_START_JOB = """UPDATE jobs SET state = 'RUNNING', started_at = COALESCE(started_at, ?)
    WHERE id = ? AND state = 'QUEUED'"""
# The stall clock runs while the job has a leased chunk: a lease starts it unless one already had.
_RUN_STALL_CLOCK = "UPDATE jobs SET stall_started_at = COALESCE(stall_started_at, ?) WHERE id = ?"
# ...and stops, keeping what it counted, once no chunk of the job is leased.
_PAUSE_STALL_CLOCK = f"""UPDATE jobs SET stalled_before = stalled_before + (? - stall_started_at),
        stall_started_at = NULL
    WHERE id = ? AND stall_started_at IS NOT NULL AND NOT {_HAS_LEASED_CHUNK}"""
# Progress sets it back to zero.
_RESET_STALL_CLOCK = f"""UPDATE jobs SET stalled_before = 0,
        stall_started_at = CASE WHEN {_HAS_LEASED_CHUNK} THEN ? ELSE NULL END
    WHERE id = ?"""
# Frames rising end a chunk's run of failures.
_CHUNK_PROGRESSED = """UPDATE chunks SET progress_at = ?, failing_since = NULL, failure_streak = 0
    WHERE lease_id = ? AND state = 'LEASED' AND frames_done < ?"""
_RECORD_PROGRESS = """UPDATE chunks SET lease_expires_at = ?, frames_done = ?, stage = ?, faces = ?
    WHERE lease_id = ? AND state = 'LEASED'"""
_FINISH_CHUNK = """UPDATE chunks SET state = 'DONE', segment_uri = ?, stats_json = ?, frames_done = ?,
        faces = ?, failing_since = NULL, failure_streak = 0
    WHERE job_id = ? AND idx = ? AND lease_id = ? AND state = 'LEASED'"""
_COUNT_UNFINISHED_CHUNKS = "SELECT COUNT(*) AS n FROM chunks WHERE job_id = ? AND state != 'DONE'"
_REQUEUE_CHUNK = """UPDATE chunks SET state = 'PENDING', lease_id = '', lease_expires_at = 0, worker_id = '',
        error_code = ?, error_message = ?, not_before = ?, failing_since = ?, failure_streak = ?
    WHERE job_id = ? AND idx = ? AND lease_id = ? AND state = 'LEASED'"""
# A PENDING chunk has the empty lease id, so one call fails a leased chunk or a queued one.
_FAIL_CHUNK = """UPDATE chunks SET state = 'FAILED', lease_id = '', lease_expires_at = 0, worker_id = '',
        error_code = ?, error_message = ?
    WHERE job_id = ? AND idx = ? AND lease_id = ? AND state IN ('PENDING', 'LEASED')"""
_LAPSED_LEASES = "SELECT * FROM chunks WHERE state = 'LEASED' AND lease_expires_at < ? ORDER BY job_id, idx"
_BUDGET_SPENT_CHUNKS = f"""SELECT c.* FROM chunks c JOIN jobs j ON j.id = c.job_id
    WHERE c.state = 'PENDING' AND c.failing_since IS NOT NULL AND c.failing_since <= ? AND c.not_before <= ?
        AND {_LIVE_JOB}
    ORDER BY c.job_id, c.idx"""
_STALLED_JOBS = """SELECT id, stalled_before + (? - stall_started_at) AS stalled FROM jobs
    WHERE state = 'RUNNING' AND stall_started_at IS NOT NULL AND stalled_before + (? - stall_started_at) > ?
    ORDER BY seq"""
_LEAST_RECENTLY_PROGRESSED_CHUNK = """SELECT * FROM chunks WHERE job_id = ? AND state = 'LEASED'
    ORDER BY progress_at, idx LIMIT 1"""
_TRANSITION_JOB = """UPDATE jobs SET state = ?,
        finished_at = CASE WHEN ? THEN ? ELSE finished_at END,
        error_code = COALESCE(?, error_code),
        error_message = COALESCE(?, error_message),
        join_json = COALESCE(?, join_json),
        report_json = COALESCE(?, report_json)
    WHERE id = ? AND state IN ({from_states})"""
_OPEN_CHUNKS = "SELECT idx FROM chunks WHERE job_id = ? AND state IN ('PENDING', 'LEASED') ORDER BY idx"
_CANCEL_OPEN_CHUNKS = """UPDATE chunks SET state = 'CANCELLED'
    WHERE job_id = ? AND state IN ('PENDING', 'LEASED')"""
REQUEUE_LEASED_CHUNKS = """UPDATE chunks SET state = 'PENDING', lease_id = '', lease_expires_at = 0,
        worker_id = '', frames_done = 0, stage = '', faces = 0
    WHERE state = 'LEASED'"""
# With no chunk leased, no stall clock runs; the time the gateway was down is not counted.
STOP_STALL_CLOCKS = "UPDATE jobs SET stall_started_at = NULL WHERE stall_started_at IS NOT NULL"
JOINING_JOB_IDS = "SELECT id FROM jobs WHERE state = 'JOINING' ORDER BY seq"
JOB_STATE = "SELECT state FROM jobs WHERE id = ?"
_COUNT_JOBS_BY_STATE = "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"
_COUNT_OPEN_CHUNKS_BY_STATE = f"""SELECT c.state, COUNT(*) AS n FROM chunks c JOIN jobs j ON j.id = c.job_id
    WHERE c.state IN ('PENDING', 'LEASED') AND {_LIVE_JOB} GROUP BY c.state"""
_ENDED_STATES = tuple(sorted(ENDED_JOB_STATES))
_ENDED_STATE_PLACEHOLDERS = ", ".join("?" for _ in _ENDED_STATES)
_JOB_SUMMARIES = "SELECT id, tenant, state, finished_at FROM jobs ORDER BY seq"
# A job never leaves an ended state, and ending it cancelled its open chunks: no lease holds its rows.
# Chunks before the job, the order leasing locks them in.
_DELETE_ENDED_JOB_CHUNKS = f"""DELETE FROM chunks WHERE job_id = ?
    AND EXISTS (SELECT 1 FROM jobs WHERE id = ? AND state IN ({_ENDED_STATE_PLACEHOLDERS}))"""
_DELETE_ENDED_JOB = f"DELETE FROM jobs WHERE id = ? AND state IN ({_ENDED_STATE_PLACEHOLDERS})"
_FORGET_STORAGE = "DELETE FROM tenant_storage WHERE tenant NOT IN ({tenants})"
# Upserts, so gateways measuring at once never collide on a tenant's row.
_RECORD_STORAGE = """INSERT INTO tenant_storage (tenant, used_bytes, max_bytes) VALUES (?, ?, ?)
    ON CONFLICT (tenant) DO UPDATE SET used_bytes = excluded.used_bytes, max_bytes = excluded.max_bytes"""
_ADD_STORED_BYTES = """INSERT INTO tenant_storage (tenant, used_bytes, max_bytes) VALUES (?, ?, ?)
    ON CONFLICT (tenant) DO UPDATE SET used_bytes = tenant_storage.used_bytes + excluded.used_bytes"""
# The tenant's own row sorts after the default row, whose name is empty.
_STORAGE_OF = """SELECT tenant, used_bytes, max_bytes FROM tenant_storage WHERE tenant IN (?, ?)
    ORDER BY tenant DESC LIMIT 1"""
_LEGACY_IMAGES = f"""SELECT j.id, j.source_image, j.reference_image FROM jobs j WHERE {_LIVE_JOB}"""
_SET_IMAGE_URIS = "UPDATE jobs SET source_image_uri = ?, reference_image_uri = ? WHERE id = ?"


def _target_to_json(target: MediaInfo | None) -> str | None:
    return None if target is None else json.dumps(dataclasses.asdict(target))


def _target_from_json(text: str | None) -> MediaInfo | None:
    if text is None:
        return None
    raw = json.loads(text)
    raw["keyframes"] = tuple(Keyframe(**keyframe) for keyframe in raw["keyframes"])
    raw["time_base"] = tuple(raw.get("time_base", (1, 1)))
    return MediaInfo(**raw)


def _stats_from_json(text: str | None) -> ChunkStats | None:
    if text is None:
        return None
    raw = json.loads(text)
    raw["face_count_changes"] = tuple(FaceCountChange(**change) for change in raw["face_count_changes"])
    raw["warnings"] = tuple(raw["warnings"])
    return ChunkStats(**raw)


def _error_from_row(row: Row) -> JobError | None:
    return None if row["error_code"] is None else JobError(code=row["error_code"], message=row["error_message"])


def _job_from_row(row: Row) -> JobRecord:
    join_json = row["join_json"]
    return JobRecord(
        id=row["id"],
        tenant=row["tenant"],
        state=row["state"],
        selector=row["selector"],
        target_uri=row["target_uri"],
        output_uri=row["output_uri"],
        source_image_uri=row["source_image_uri"],
        reference_image_uri=row["reference_image_uri"],
        encode=EncodeOptions(crf=row["encode_crf"], preset=row["encode_preset"]),
        target=_target_from_json(row["target_json"]),
        frames_total=row["frames_total"],
        chunks_total=row["chunks_total"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=_error_from_row(row),
        join=None if join_json is None else JoinOutcome(**json.loads(join_json)),
        report_json=row["report_json"],
        chunks_done=row["chunks_done"],
        frames_done=row["frames_done"],
        models=job_models(row["swapper"], row["detector"]),
        idempotency_key=row["idempotency_key"] or "",
        payload_fingerprint=row["payload_fingerprint"],
        batch_id=row["batch_id"],
    )


def _chunk_from_row(row: Row) -> ChunkRecord:
    return ChunkRecord(
        job_id=row["job_id"],
        index=row["idx"],
        state=row["state"],
        start_frame=row["start_frame"],
        seek_pts=row["seek_pts"],
        frame_count=row["frame_count"],
        segment_uri=row["segment_uri"],
        attempts=row["attempts"],
        lease_id=row["lease_id"],
        lease_expires_at=row["lease_expires_at"],
        worker_id=row["worker_id"],
        frames_done=row["frames_done"],
        stage=row["stage"],
        faces=row["faces"],
        stats=_stats_from_json(row["stats_json"]),
        last_error=_error_from_row(row),
        not_before=row["not_before"],
        failing_since=row["failing_since"],
        failure_streak=row["failure_streak"],
        progress_at=row["progress_at"],
    )


def _job_values(job: JobRecord) -> tuple[Any, ...]:
    return (
        job.id,
        job.tenant,
        job.state,
        job.selector,
        job.target_uri,
        job.output_uri,
        job.source_image_uri,
        job.reference_image_uri,
        job.encode.crf,
        job.encode.preset,
        _target_to_json(job.target),
        job.frames_total,
        job.chunks_total,
        job.created_at,
        job.started_at,
        job.finished_at,
        None if job.error is None else job.error.code,
        None if job.error is None else job.error.message,
        job.report_json,
        job.models.swapper,
        job.models.detector,
        job.idempotency_key or None,
        job.payload_fingerprint,
        job.batch_id,
    )


def _batch_spec_json(batch: BatchRecord) -> str:
    return json.dumps(
        {
            "targets": list(batch.target_names),
            "sources": list(batch.source_names),
            "entries": [dataclasses.asdict(entry) for entry in batch.entries],
        }
    )


def _batch_from_row(row: Row) -> BatchRecord:
    spec = json.loads(row["spec_json"])
    return BatchRecord(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        created_at=row["created_at"],
        target_names=tuple(spec["targets"]),
        source_names=tuple(spec["sources"]),
        entries=tuple(BatchEntry(**entry) for entry in spec["entries"]),
        cancelled_at=row["cancelled_at"],
        idempotency_key=row["idempotency_key"] or "",
        payload_fingerprint=row["payload_fingerprint"],
    )


def _placeholders(values: Collection[Any]) -> str:
    return ", ".join("?" for _ in values)


def _tenant_limit(limits: TenantChunkLimits) -> tuple[str, list[int | str]]:
    """The limit of job j's tenant as an SQL expression, with its parameters."""
    if not limits.tenants:
        return "?", [limits.default]
    cases = " ".join("WHEN ? THEN ?" for _ in limits.tenants)
    params: list[int | str] = [value for case in limits.tenants.items() for value in case]
    return f"CASE j.tenant {cases} ELSE ? END", [*params, limits.default]


class SqlJobStore(ABC):
    """Durable jobs and chunks over one connection; every write is one explicit transaction."""

    dialect: ClassVar[SqlDialect]

    def __init__(self) -> None:
        # Reentrant: an operation run through `run` holds it while its transactions take it again.
        self._lock = threading.RLock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store")

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Held by every transaction and read: one thread at a time uses the connection."""
        with self._lock:
            yield

    async def run(
        self, operation: Callable[ArgumentsP, ResultT], *args: ArgumentsP.args, **kwargs: ArgumentsP.kwargs
    ) -> ResultT:
        """Runs a blocking operation on the store (a method, or code that calls several) on the store's
        thread, while the event loop goes on serving."""

        def exclusively() -> ResultT:
            with self._lock:
                return operation(*args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._thread, exclusively)

    def _stop_thread(self) -> None:
        self._thread.shutdown(wait=True)

    @abstractmethod
    def _announce(self, job_id: str) -> None:
        """Called inside each transaction that changes a job: tells the other gateways, where there are any."""

    @abstractmethod
    def _announce_work_added(self, job_id: str) -> None:
        """Called inside each transaction that makes chunks of a job PENDING: tells the other gateways' waiting
        leases, where there are any (this gateway's own are woken by the caller)."""

    @abstractmethod
    async def follow_changes(self, changed: JobChanged) -> None:
        """Calls `changed` for each job another gateway changes, until cancelled; returns at once where no
        other gateway shares the store."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[None]:
        """Commits when the block ends, rolls back when it raises; nothing else is open meanwhile."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[None]:
        """Wraps reads that need no write lock."""

    @abstractmethod
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]: ...

    @abstractmethod
    def _change(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs a write statement; the number of rows it changed."""

    @abstractmethod
    def _change_many(self, sql: str, params: Iterable[Sequence[Any]]) -> None: ...

    @abstractmethod
    def _column_names(self, table: str) -> set[str]:
        """The columns the table has now (a store made by an earlier version may lack some)."""

    @abstractmethod
    def recover_after_restart(self) -> list[str]:
        """Called once before serving: the ids of JOINING jobs this gateway must join again.

        SQLite also puts every LEASED chunk back to PENDING (its gateway was the only one); PostgreSQL,
        shared by gateways, leaves leases to the reapers and returns only joins no live gateway holds.
        """

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _claim_join(self, job_id: str) -> None:
        """Called inside the transaction that moves a job to JOINING."""

    @abstractmethod
    def _job_left_joining(self, job_id: str) -> None:
        """Called after the transaction of any attempt to end a job."""

    def _lease_ended(self, job_id: str) -> None:
        """Inside a transaction that ended a lease of the job's (its chunk finished, or its job ended):
        its tenant holds one chunk fewer, so leases waiting on any gateway look again if the tenant's limit may
        be holding back chunks of its own."""
        if self._rows(_TENANT_HAS_PENDING_CHUNK, (job_id,)):
            self._announce_work_added(job_id)

    def _migrate(self, media_root: Path) -> None:
        """Brings a store made by an earlier version to this one's schema; runs inside a transaction.

        Missing columns are added (old jobs belong to the local tenant). Images kept in the job table are
        written to media storage for the jobs that may still lease chunks, and the image columns dropped:
        an ended job's images are never read again.
        """
        values = _dialect_values(self.dialect)
        for table, column, definition in _ADDED_COLUMNS:
            if column not in self._column_names(table):
                self._change(f"ALTER TABLE {table} ADD COLUMN {column} {definition.format(**values)}")
        legacy = [column for column in _LEGACY_IMAGE_COLUMNS if column in self._column_names("jobs")]
        if legacy:
            self._move_images_to_media(media_root)
            for column in legacy:
                self._change(f"ALTER TABLE jobs DROP COLUMN {column}")
        for statement in _INDEXES:
            self._change(statement)

    def _move_images_to_media(self, media_root: Path) -> None:
        for row in self._rows(_LEGACY_IMAGES):
            job_id = row["id"]
            source_uri = source_image_uri(job_id)
            write_media_file(media_root, source_uri, bytes(row["source_image"]))
            reference = bytes(row["reference_image"])
            reference_uri = reference_image_uri(job_id) if reference else ""
            if reference:
                write_media_file(media_root, reference_uri, reference)
            self._change(_SET_IMAGE_URIS, (source_uri, reference_uri, job_id))

    def add_job(self, job: JobRecord, chunks: Sequence[PlannedChunk], stored_bytes: int = 0) -> str:
        """stored_bytes: media stored for the job (its upload), counted to its tenant's storage at once.

        The id of the job stored under the job's idempotency key: job.id, unless its tenant already has a
        job with that key (stored before, or by a submission that raced this one), whose id it is; then
        nothing is added. A job without a key is always added.
        """
        with self._transaction():
            if not self._change(_INSERT_JOB, _job_values(job)):
                # The conflicting row is committed (PostgreSQL waits for a racing insert to commit), and a
                # statement of a READ COMMITTED transaction sees it.
                holder = self._rows(_JOB_WITH_KEY, (job.tenant, job.idempotency_key))
                return str(holder[0]["id"])
            self._insert_chunks(job, chunks)
            if stored_bytes:
                self._count_stored_bytes(job.tenant, stored_bytes)
        return job.id

    def _insert_chunks(self, job: JobRecord, chunks: Sequence[PlannedChunk]) -> None:
        """Inside the transaction that inserted the job: its chunks, and the news of it."""
        self._announce(job.id)
        if chunks:
            self._announce_work_added(job.id)
        self._change_many(
            _INSERT_CHUNK,
            [
                (job.id, chunk.index, chunk.start_frame, chunk.seek_pts, chunk.frame_count, chunk.segment_uri)
                for chunk in chunks
            ],
        )

    def add_batch(
        self, batch: BatchRecord, jobs: Sequence[tuple[JobRecord, Sequence[PlannedChunk]]], stored_bytes: int = 0
    ) -> str:
        """Stores the batch with its jobs (each with the batch's id) and their chunks in one transaction, so no
        reader sees part of a batch. As add_job: the id of the batch holding the key, batch.id unless its tenant
        already has a batch with that key, whose id it is; then nothing is added."""
        with self._transaction():
            inserted = self._change(
                _INSERT_BATCH,
                (
                    batch.id,
                    batch.tenant,
                    batch.name,
                    batch.created_at,
                    batch.idempotency_key or None,
                    batch.payload_fingerprint,
                    _batch_spec_json(batch),
                ),
            )
            if not inserted:
                holder = self._rows(_BATCH_WITH_KEY, (batch.tenant, batch.idempotency_key))
                return str(holder[0]["id"])
            for job, chunks in jobs:
                self._change(_INSERT_JOB, _job_values(dataclasses.replace(job, batch_id=batch.id)))
                self._insert_chunks(job, chunks)
            if stored_bytes:
                self._count_stored_bytes(batch.tenant, stored_bytes)
        return batch.id

    def batch_with_key(self, tenant: str, idempotency_key: str) -> BatchRecord | None:
        with self._reading():
            rows = self._rows(_BATCH_WITH_KEY, (tenant, idempotency_key))
        return _batch_from_row(rows[0]) if rows else None

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self._reading():
            rows = self._rows(_SELECT_BATCH, (batch_id,))
        return _batch_from_row(rows[0]) if rows else None

    def batch_jobs(self, batch_id: str) -> list[JobRecord]:
        """The batch's jobs still stored, oldest first."""
        with self._reading():
            rows = self._rows(_BATCH_JOBS, (batch_id,))
        return [_job_from_row(row) for row in rows]

    def mark_batch_cancelled(self, batch_id: str, at: float) -> None:
        """Records the cancellation (the first one's time); the caller cancels the jobs."""
        with self._transaction():
            self._change(_CANCEL_BATCH, (at, batch_id))

    def batch_summaries(self) -> list[BatchSummary]:
        """Every stored batch, oldest first: its tenant, creation, and whether a job of it is still stored."""
        with self._reading():
            rows = self._rows(_BATCH_SUMMARIES)
        return [BatchSummary(row["id"], row["tenant"], float(row["created_at"]), bool(row["has_jobs"])) for row in rows]

    def delete_emptied_batches(self, batch_ids: Iterable[str]) -> list[str]:
        """Deletes those of the batches that no longer have a stored job; the ids it deleted."""
        deleted: list[str] = []
        with self._transaction():
            for batch_id in batch_ids:
                if self._change(_DELETE_EMPTIED_BATCH, (batch_id, batch_id)) == 1:
                    deleted.append(batch_id)
        return deleted

    def job_with_key(self, tenant: str, idempotency_key: str) -> JobRecord | None:
        """The tenant's job that holds the idempotency key, if it is still stored."""
        with self._reading():
            rows = self._rows(_JOB_WITH_KEY, (tenant, idempotency_key))
        return _job_from_row(rows[0]) if rows else None

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._reading():
            rows = self._rows(_SELECT_JOB, (job_id,))
        return _job_from_row(rows[0]) if rows else None

    def list_jobs(self, limit: int, state: JobState | None = None, tenant: str | None = None) -> list[JobRecord]:
        """Newest first; only the tenant's jobs when a tenant is given."""
        return self.list_jobs_page(limit, state, tenant)[0]

    def list_jobs_page(
        self,
        limit: int,
        state: JobState | None = None,
        tenant: str | None = None,
        after: JobCursor | None = None,
        batch_id: str = "",
    ) -> tuple[list[JobRecord], JobCursor | None]:
        """Up to `limit` jobs after the cursor (all from the newest when None), in ListJobs' order, and the
        cursor of the last one if more jobs follow it (None on the last page). Only the batch's when given."""
        conditions: list[str] = []
        params: list[Any] = []
        if batch_id:
            conditions.append("batch_id = ?")
            params.append(batch_id)
        if after is not None:
            conditions.append(_BEFORE_CURSOR)
            params.extend((after.created_at, after.created_at, after.job_id))
        if state is not None:
            conditions.append("state = ?")
            params.append(state)
        if tenant is not None:
            conditions.append("tenant = ?")
            params.append(tenant)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        with self._reading():
            # One more than the page: whether another page follows, without a final empty one.
            rows = self._rows(_LIST_JOBS.format(where=where), (*params, limit + 1))
        page = rows[:limit]
        more = len(rows) > limit and bool(page)
        cursor = JobCursor(float(page[-1]["created_at"]), str(page[-1]["id"])) if more else None
        return [_job_from_row(row) for row in page], cursor

    def list_chunks(self, job_id: str) -> list[ChunkRecord]:
        with self._reading():
            rows = self._rows(_LIST_CHUNKS, (job_id,))
        return [_chunk_from_row(row) for row in rows]

    def chunk_for_lease(self, lease_id: str) -> ChunkRecord | None:
        if not lease_id:
            return None
        with self._reading():
            rows = self._rows(_SELECT_LEASED_CHUNK, (lease_id,))
        return _chunk_from_row(rows[0]) if rows else None

    def lease_next_chunk(
        self,
        worker_id: str,
        lease_id: str,
        now: float,
        expires_at: float,
        limits: TenantChunkLimits = NO_TENANT_CHUNK_LIMITS,
    ) -> ChunkRecord | None:
        """Leases the next due PENDING chunk of a live job, in _NEXT_PENDING_CHUNK's order, whose tenant holds fewer
        leased chunks than its limit; its job becomes RUNNING."""
        tenant_limit, limit_params = _tenant_limit(limits)
        statement = _NEXT_PENDING_CHUNK.format(tenant_limit=tenant_limit) + self.dialect.lease_lock
        with self._transaction():
            if self.dialect.lease_turn:
                self._rows(self.dialect.lease_turn)
            rows = self._rows(statement, (now, *limit_params, *limit_params))
            if not rows:
                return None
            job_id, index = rows[0]["job_id"], rows[0]["idx"]
            self._change(_LEASE_CHUNK, (lease_id, expires_at, worker_id, now, job_id, index))
            self._change(_START_JOB, (now, job_id))
            self._change(_RUN_STALL_CLOCK, (now, job_id))
            self._announce(job_id)
        return self.chunk_for_lease(lease_id)

    def next_due_at(self, now: float) -> float | None:
        """When the next PENDING chunk now backing off becomes due; None if none is."""
        with self._reading():
            rows = self._rows(_NEXT_DUE, (now,))
        due = rows[0]["due"] if rows else None
        return None if due is None else float(due)

    def record_progress(
        self, job_id: str, lease_id: str, expires_at: float, frames_done: int, stage: str, faces: int, now: float
    ) -> None:
        """Extends the lease; frames rising count as progress for the stall deadline and the retry budget."""
        with self._transaction():
            progressed = self._change(_CHUNK_PROGRESSED, (now, lease_id, frames_done)) > 0
            self._change(_RECORD_PROGRESS, (expires_at, frames_done, stage, faces, lease_id))
            if progressed:
                self._change(_RESET_STALL_CLOCK, (now, job_id))
            self._announce(job_id)

    def finish_chunk(
        self, job_id: str, index: int, lease_id: str, segment_uri: str, stats: ChunkStats, now: float
    ) -> int | None:
        """Marks the chunk DONE if lease_id still holds it: the job's chunks not yet DONE, else None."""
        stats_json = json.dumps(dataclasses.asdict(stats))
        with self._transaction():
            finished = self._change(
                _FINISH_CHUNK, (segment_uri, stats_json, stats.frames, stats.faces, job_id, index, lease_id)
            )
            if not finished:
                return None
            self._change(_RESET_STALL_CLOCK, (now, job_id))
            self._announce(job_id)
            self._lease_ended(job_id)
            remaining = self._rows(_COUNT_UNFINISHED_CHUNKS, (job_id,))[0]["n"]
        return int(remaining)

    def requeue_chunk(self, chunk: ChunkRecord, error: JobError, retry: RetrySchedule, now: float) -> bool:
        """Ends the chunk's lease and queues it again at retry.not_before; False if the lease had ended."""
        with self._transaction():
            requeued = self._change(
                _REQUEUE_CHUNK,
                (
                    error.code,
                    error.message,
                    retry.not_before,
                    retry.failing_since,
                    retry.failure_streak,
                    chunk.job_id,
                    chunk.index,
                    chunk.lease_id,
                ),
            )
            self._change(_PAUSE_STALL_CLOCK, (now, chunk.job_id))
            self._announce(chunk.job_id)
            if requeued:
                self._announce_work_added(chunk.job_id)
        return requeued == 1

    def fail_chunk(self, chunk: ChunkRecord, error: JobError, now: float) -> bool:
        """The chunk (leased or queued, as read) is FAILED; False if it had moved on meanwhile."""
        with self._transaction():
            failed = self._change(_FAIL_CHUNK, (error.code, error.message, chunk.job_id, chunk.index, chunk.lease_id))
            self._change(_PAUSE_STALL_CLOCK, (now, chunk.job_id))
            self._announce(chunk.job_id)
        return failed == 1

    def lapsed_leases(self, now: float) -> list[ChunkRecord]:
        with self._reading():
            rows = self._rows(_LAPSED_LEASES, (now,))
        return [_chunk_from_row(row) for row in rows]

    def budget_spent_chunks(self, failing_since_before: float, due_before: float) -> list[ChunkRecord]:
        """Queued chunks of live jobs failing since failing_since_before or earlier, due since due_before."""
        with self._reading():
            rows = self._rows(_BUDGET_SPENT_CHUNKS, (failing_since_before, due_before))
        return [_chunk_from_row(row) for row in rows]

    def stalled_jobs(self, now: float, deadline_seconds: float) -> list[StalledJob]:
        """RUNNING jobs whose stall clock (leased time without progress) has passed the deadline."""
        stalled: list[StalledJob] = []
        with self._reading():
            for row in self._rows(_STALLED_JOBS, (now, now, deadline_seconds)):
                chunks = self._rows(_LEAST_RECENTLY_PROGRESSED_CHUNK, (row["id"],))
                stalled.append(
                    StalledJob(
                        job_id=row["id"],
                        stalled_seconds=float(row["stalled"]),
                        chunk=_chunk_from_row(chunks[0]) if chunks else None,
                    )
                )
        return stalled

    def transition_job(
        self,
        job_id: str,
        from_states: Collection[JobState],
        to_state: JobState,
        at: float,
        error: JobError | None = None,
        join: JoinOutcome | None = None,
        report_json: str | None = None,
    ) -> bool:
        """Moves the job only from one of from_states; an ended job's open chunks are CANCELLED.

        A report given here is stored in the same transaction, so no reader sees an ended job
        without the report it ended with.
        """
        ended = to_state in ENDED_JOB_STATES
        with self._transaction():
            if ended and self.dialect.open_chunks_lock:
                # Chunks before the job, the order leasing locks them in, so the two never deadlock.
                self._rows(_OPEN_CHUNKS + self.dialect.open_chunks_lock, (job_id,))
            changed = (
                self._change(
                    _TRANSITION_JOB.format(from_states=_placeholders(from_states)),
                    (
                        to_state,
                        ended,
                        at,
                        None if error is None else error.code,
                        None if error is None else error.message,
                        None if join is None else json.dumps(dataclasses.asdict(join)),
                        report_json,
                        job_id,
                        *from_states,
                    ),
                )
                == 1
            )
            if changed:
                self._announce(job_id)
            if changed and ended:
                self._change(_CANCEL_OPEN_CHUNKS, (job_id,))
                self._lease_ended(job_id)
            if changed and to_state == "JOINING":
                self._claim_join(job_id)
        if ended:
            self._job_left_joining(job_id)
        return changed

    def count_jobs_by_state(self) -> dict[JobState, int]:
        with self._reading():
            rows = self._rows(_COUNT_JOBS_BY_STATE)
        return {cast(JobState, row["state"]): int(row["n"]) for row in rows}

    def count_open_chunks_by_state(self) -> dict[ChunkState, int]:
        """The open chunks (PENDING and LEASED) of live jobs, by state; a state without chunks is absent."""
        with self._reading():
            rows = self._rows(_COUNT_OPEN_CHUNKS_BY_STATE)
        return {cast(ChunkState, row["state"]): int(row["n"]) for row in rows}

    def count_pending_chunks(self) -> int:
        return self.count_open_chunks_by_state().get("PENDING", 0)

    def job_summaries(self) -> list[JobSummary]:
        """Every stored job, oldest first: its tenant, state and end."""
        with self._reading():
            rows = self._rows(_JOB_SUMMARIES)
        return [JobSummary(row["id"], row["tenant"], row["state"], row["finished_at"]) for row in rows]

    def delete_ended_jobs(self, job_ids: Iterable[str]) -> list[str]:
        """Deletes those of the jobs that have ended, with their chunks; the ids it deleted."""
        deleted: list[str] = []
        with self._transaction():
            for job_id in job_ids:
                self._change(_DELETE_ENDED_JOB_CHUNKS, (job_id, job_id, *_ENDED_STATES))
                if self._change(_DELETE_ENDED_JOB, (job_id, *_ENDED_STATES)) == 1:
                    self._announce(job_id)
                    deleted.append(job_id)
        return deleted

    def record_storage(self, storage: Collection[TenantStorage]) -> None:
        """Replaces every tenant's measured storage and limit. `storage` holds a row under
        DEFAULT_STORAGE_TENANT, the limit of tenants without a row of their own."""
        tenants = [row.tenant for row in storage]
        with self._transaction():
            self._change(_FORGET_STORAGE.format(tenants=_placeholders(tenants)), tenants)
            self._change_many(_RECORD_STORAGE, [(row.tenant, row.used_bytes, row.max_bytes) for row in storage])

    def storage_of(self, tenant: str) -> TenantStorage:
        """The tenant's storage as last recorded; a tenant without a row has used nothing yet and the default
        limit, and with no rows at all (nothing measured yet) there is no limit."""
        with self._reading():
            rows = self._rows(_STORAGE_OF, (tenant, DEFAULT_STORAGE_TENANT))
        if not rows:
            return TenantStorage(tenant, 0, 0)
        row = rows[0]
        used = int(row["used_bytes"]) if row["tenant"] == tenant else 0
        return TenantStorage(tenant, used, int(row["max_bytes"]))

    def _count_stored_bytes(self, tenant: str, stored_bytes: int) -> None:
        """Counts media the tenant stored since the last measurement, so its next submission sees it."""
        rows = self._rows(_STORAGE_OF, (tenant, DEFAULT_STORAGE_TENANT))
        # With nothing recorded yet, the first measurement will count it.
        if rows:
            self._change(_ADD_STORED_BYTES, (tenant, stored_bytes, int(rows[0]["max_bytes"])))

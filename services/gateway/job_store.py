"""Durable jobs and chunks: the JobStore protocol and its embedded SQLite implementation.

SQLite serves one gateway process: one connection, used only from the event loop, every call a
short transaction, WAL so readers (a backup, the CLI) never block it. A cluster store (PostgreSQL)
implements the same protocol; until then its URL is refused at startup.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from services.common.errors import InvalidArgument
from services.common.media_info import Keyframe, MediaInfo
from services.gateway.job_records import (
    ENDED_JOB_STATES,
    ChunkRecord,
    ChunkState,
    ChunkStats,
    EncodeOptions,
    FaceCountChange,
    JobError,
    JobRecord,
    JobState,
    JoinOutcome,
    PlannedChunk,
)

SQLITE_SCHEME = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
DEFAULT_DATABASE_NAME = "swapline.db"


class JobStore(Protocol):
    def add_job(self, job: JobRecord, chunks: Sequence[PlannedChunk]) -> None: ...

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(self, limit: int, state: JobState | None = None) -> list[JobRecord]: ...

    def list_chunks(self, job_id: str) -> list[ChunkRecord]: ...

    def chunk_for_lease(self, lease_id: str) -> ChunkRecord | None: ...

    def lease_next_chunk(
        self, worker_id: str, lease_id: str, now: float, expires_at: float
    ) -> ChunkRecord | None:
        """Leases the first PENDING chunk of the oldest live job; its job becomes RUNNING."""
        ...

    def record_progress(
        self, lease_id: str, expires_at: float, frames_done: int, stage: str, faces: int
    ) -> None: ...

    def finish_chunk(self, job_id: str, index: int, segment_uri: str, stats: ChunkStats) -> bool:
        """Marks the chunk DONE; True when every chunk of the job is DONE."""
        ...

    def release_chunk(self, job_id: str, index: int, error: JobError, retry: bool) -> None:
        """Ends the chunk's lease: PENDING again when retry, else FAILED."""
        ...

    def lapsed_leases(self, now: float) -> list[ChunkRecord]: ...

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
        ...

    def recover_after_restart(self) -> list[str]:
        """Puts LEASED chunks back to PENDING; returns the ids of jobs that were JOINING."""
        ...

    def count_jobs_by_state(self) -> dict[JobState, int]: ...

    def count_pending_chunks(self) -> int: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    selector TEXT NOT NULL,
    target_uri TEXT NOT NULL,
    output_uri TEXT NOT NULL,
    source_image BLOB NOT NULL,
    reference_image BLOB NOT NULL,
    encode_crf INTEGER NOT NULL,
    encode_preset TEXT NOT NULL,
    target_json TEXT,
    frames_total INTEGER NOT NULL,
    chunks_total INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error_code INTEGER,
    error_message TEXT,
    join_json TEXT,
    report_json TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    start_frame INTEGER NOT NULL,
    seek_pts INTEGER NOT NULL,
    frame_count INTEGER NOT NULL,
    segment_uri TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_id TEXT NOT NULL DEFAULT '',
    lease_expires_at REAL NOT NULL DEFAULT 0,
    worker_id TEXT NOT NULL DEFAULT '',
    frames_done INTEGER NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    faces INTEGER NOT NULL DEFAULT 0,
    stats_json TEXT,
    error_code INTEGER,
    error_message TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS chunks_by_state ON chunks (state);
CREATE INDEX IF NOT EXISTS chunks_by_lease ON chunks (lease_id);
"""

# chunks_done and frames_done come from the chunks; a leased chunk counts the frames its worker reported.
_JOB_COLUMNS = """
    jobs.*,
    (SELECT COUNT(*) FROM chunks c WHERE c.job_id = jobs.id AND c.state = 'DONE') AS chunks_done,
    (SELECT COALESCE(SUM(CASE WHEN c.state = 'DONE' THEN c.frame_count
                              WHEN c.state = 'LEASED' THEN MIN(c.frames_done, c.frame_count)
                              ELSE 0 END), 0)
       FROM chunks c WHERE c.job_id = jobs.id) AS frames_done
"""


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


def _error_from_row(row: sqlite3.Row) -> JobError | None:
    return (
        None if row["error_code"] is None else JobError(code=row["error_code"], message=row["error_message"])
    )


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    join_json = row["join_json"]
    return JobRecord(
        id=row["id"],
        state=row["state"],
        selector=row["selector"],
        target_uri=row["target_uri"],
        output_uri=row["output_uri"],
        source_image=bytes(row["source_image"]),
        reference_image=bytes(row["reference_image"]),
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
    )


def _chunk_from_row(row: sqlite3.Row) -> ChunkRecord:
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
    )


def _placeholders(values: Collection[Any]) -> str:
    return ", ".join("?" for _ in values)


class SqliteJobStore:
    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def _transaction(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        self._db.execute("ROLLBACK")

    def add_job(self, job: JobRecord, chunks: Sequence[PlannedChunk]) -> None:
        db = self._transaction()
        try:
            db.execute(
                """INSERT INTO jobs (id, state, selector, target_uri, output_uri, source_image,
                       reference_image, encode_crf, encode_preset, target_json, frames_total, chunks_total,
                       created_at, started_at, finished_at, error_code, error_message, join_json, report_json)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)""",
                (
                    job.id,
                    job.state,
                    job.selector,
                    job.target_uri,
                    job.output_uri,
                    job.source_image,
                    job.reference_image,
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
                ),
            )
            db.executemany(
                """INSERT INTO chunks (job_id, idx, state, start_frame, seek_pts, frame_count, segment_uri)
                   VALUES (?, ?, 'PENDING', ?, ?, ?, ?)""",
                [
                    (
                        job.id,
                        chunk.index,
                        chunk.start_frame,
                        chunk.seek_pts,
                        chunk.frame_count,
                        chunk.segment_uri,
                    )
                    for chunk in chunks
                ],
            )
        except BaseException:
            self._rollback()
            raise
        self._commit()

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    def list_jobs(self, limit: int, state: JobState | None = None) -> list[JobRecord]:
        if state is None:
            rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?", (state, limit)
            )
        return [_job_from_row(row) for row in rows]

    def list_chunks(self, job_id: str) -> list[ChunkRecord]:
        rows = self._db.execute("SELECT * FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,))
        return [_chunk_from_row(row) for row in rows]

    def chunk_for_lease(self, lease_id: str) -> ChunkRecord | None:
        if not lease_id:
            return None
        row = self._db.execute("SELECT * FROM chunks WHERE lease_id = ?", (lease_id,)).fetchone()
        return None if row is None else _chunk_from_row(row)

    def lease_next_chunk(
        self, worker_id: str, lease_id: str, now: float, expires_at: float
    ) -> ChunkRecord | None:
        db = self._transaction()
        try:
            row = db.execute(
                """SELECT c.job_id, c.idx FROM chunks c JOIN jobs j ON j.id = c.job_id
                   WHERE c.state = 'PENDING' AND j.state IN ('QUEUED', 'RUNNING')
                   ORDER BY j.seq, c.idx LIMIT 1"""
            ).fetchone()
            if row is None:
                self._rollback()
                return None
            job_id, index = row["job_id"], row["idx"]
            db.execute(
                """UPDATE chunks SET state = 'LEASED', attempts = attempts + 1, lease_id = ?,
                       lease_expires_at = ?, worker_id = ?, frames_done = 0, stage = '', faces = 0
                   WHERE job_id = ? AND idx = ?""",
                (lease_id, expires_at, worker_id, job_id, index),
            )
            db.execute(
                """UPDATE jobs SET state = 'RUNNING', started_at = COALESCE(started_at, ?)
                   WHERE id = ? AND state = 'QUEUED'""",
                (now, job_id),
            )
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return self.chunk_for_lease(lease_id)

    def record_progress(
        self, lease_id: str, expires_at: float, frames_done: int, stage: str, faces: int
    ) -> None:
        self._db.execute(
            """UPDATE chunks SET lease_expires_at = ?, frames_done = ?, stage = ?, faces = ?
               WHERE lease_id = ? AND state = 'LEASED'""",
            (expires_at, frames_done, stage, faces, lease_id),
        )

    def finish_chunk(self, job_id: str, index: int, segment_uri: str, stats: ChunkStats) -> bool:
        db = self._transaction()
        try:
            db.execute(
                """UPDATE chunks SET state = 'DONE', segment_uri = ?, stats_json = ?, frames_done = ?,
                       faces = ?
                   WHERE job_id = ? AND idx = ?""",
                (
                    segment_uri,
                    json.dumps(dataclasses.asdict(stats)),
                    stats.frames,
                    stats.faces,
                    job_id,
                    index,
                ),
            )
            remaining = db.execute(
                "SELECT COUNT(*) FROM chunks WHERE job_id = ? AND state != 'DONE'", (job_id,)
            ).fetchone()[0]
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return int(remaining) == 0

    def release_chunk(self, job_id: str, index: int, error: JobError, retry: bool) -> None:
        state: ChunkState = "PENDING" if retry else "FAILED"
        self._db.execute(
            """UPDATE chunks SET state = ?, lease_id = '', lease_expires_at = 0, worker_id = '',
                   error_code = ?, error_message = ?
               WHERE job_id = ? AND idx = ?""",
            (state, error.code, error.message, job_id, index),
        )

    def lapsed_leases(self, now: float) -> list[ChunkRecord]:
        rows = self._db.execute(
            "SELECT * FROM chunks WHERE state = 'LEASED' AND lease_expires_at < ? ORDER BY job_id, idx",
            (now,),
        )
        return [_chunk_from_row(row) for row in rows]

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
        ended = to_state in ENDED_JOB_STATES
        db = self._transaction()
        try:
            cursor = db.execute(
                f"""UPDATE jobs SET state = ?,
                        finished_at = CASE WHEN ? THEN ? ELSE finished_at END,
                        error_code = COALESCE(?, error_code),
                        error_message = COALESCE(?, error_message),
                        join_json = COALESCE(?, join_json),
                        report_json = COALESCE(?, report_json)
                    WHERE id = ? AND state IN ({_placeholders(from_states)})""",
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
            changed = cursor.rowcount == 1
            if changed and ended:
                db.execute(
                    """UPDATE chunks SET state = 'CANCELLED'
                       WHERE job_id = ? AND state IN ('PENDING', 'LEASED')""",
                    (job_id,),
                )
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return changed

    def recover_after_restart(self) -> list[str]:
        db = self._transaction()
        try:
            db.execute(
                """UPDATE chunks SET state = 'PENDING', lease_id = '', lease_expires_at = 0, worker_id = '',
                       frames_done = 0, stage = '', faces = 0
                   WHERE state = 'LEASED'"""
            )
            rows = db.execute("SELECT id FROM jobs WHERE state = 'JOINING' ORDER BY seq").fetchall()
        except BaseException:
            self._rollback()
            raise
        self._commit()
        return [row["id"] for row in rows]

    def count_jobs_by_state(self) -> dict[JobState, int]:
        rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {cast(JobState, row["state"]): int(row["n"]) for row in rows}

    def count_pending_chunks(self) -> int:
        row = self._db.execute(
            """SELECT COUNT(*) FROM chunks c JOIN jobs j ON j.id = c.job_id
               WHERE c.state = 'PENDING' AND j.state IN ('QUEUED', 'RUNNING')"""
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        self._db.close()


def sqlite_path(database_url: str, media_root: Path) -> Path | str:
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `sqlite:///:memory:`; empty: the media root's."""
    if not database_url:
        return media_root / DEFAULT_DATABASE_NAME
    if database_url.startswith(POSTGRES_SCHEMES):
        raise InvalidArgument(
            f"database_url {database_url.split('://', 1)[0]}://...: PostgreSQL is not supported yet; "
            f"use a {SQLITE_SCHEME}<path> URL or leave it empty for {DEFAULT_DATABASE_NAME} in the media root"
        )
    if not database_url.startswith(SQLITE_SCHEME) or database_url == SQLITE_SCHEME:
        raise InvalidArgument(f"database_url {database_url!r} is not a {SQLITE_SCHEME}<path> URL")
    location = database_url[len(SQLITE_SCHEME) :]
    return location if location == ":memory:" else Path(location)


def open_job_store(database_url: str, media_root: Path) -> JobStore:
    path = sqlite_path(database_url, media_root)
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteJobStore(path)

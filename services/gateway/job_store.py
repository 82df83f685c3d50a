"""Durable jobs and chunks: the embedded SQLite store and the choice of store by database URL.

SQLite serves one gateway process: one connection, whose callers take turns (the store's own thread
serves the event loop), every call a short transaction, WAL so readers (a backup, the CLI) never
block it. PostgreSQL (postgres_job_store.py) serves a cluster of gateways sharing one database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeAlias

from services.common.errors import InvalidArgument
from services.gateway.postgres_job_store import POSTGRES_SCHEMES, PostgresJobStore
from services.gateway.sql_job_store import (
    JOINING_JOB_IDS,
    REQUEUE_LEASED_CHUNKS,
    STOP_STALL_CLOCKS,
    JobChanged,
    Row,
    SqlDialect,
    SqlJobStore,
    schema_sql,
)

SQLITE_SCHEME = "sqlite:///"
DEFAULT_DATABASE_NAME = "swapline.db"


# What the gateway holds: either store, chosen by open_job_store.
JobStore: TypeAlias = SqlJobStore


SQLITE_DIALECT = SqlDialect(
    serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
    real="REAL",
    integer="INTEGER",
    # BEGIN IMMEDIATE already serialises every writer of the file.
    lease_lock="",
    open_chunks_lock="",
)


class SqliteJobStore(SqlJobStore):
    dialect = SQLITE_DIALECT

    def __init__(self, path: Path | str, media_root: Path) -> None:
        """media_root: where a store from an earlier version has its jobs' images moved when opened."""
        super().__init__()
        # Used from the store's thread and from callers on other threads; the store's lock keeps them apart.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(schema_sql(self.dialect))
        with self._transaction():
            self._migrate(media_root)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._exclusive():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _reading(self) -> AbstractContextManager[None]:
        return self._exclusive()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        rows: list[Row] = self._db.execute(sql, params).fetchall()
        return rows

    def _change(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def _change_many(self, sql: str, params: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, params)

    def _column_names(self, table: str) -> set[str]:
        return {row["name"] for row in self._rows(f"PRAGMA table_info({table})")}

    def _claim_join(self, job_id: str) -> None:
        """Nothing to claim: no other gateway uses the file."""

    def _announce(self, job_id: str) -> None:
        """No other gateway to tell: this one's own change feed hears of every change."""

    def _announce_work_added(self, job_id: str) -> None:
        """No other gateway to tell: this one's own chunk queue is woken by the caller."""

    async def follow_changes(self, changed: JobChanged) -> None:
        """No other gateway writes the file."""

    def _job_left_joining(self, job_id: str) -> None:
        """Nothing was claimed."""

    def recover_after_restart(self) -> list[str]:
        with self._transaction():
            self._change(REQUEUE_LEASED_CHUNKS)
            self._change(STOP_STALL_CLOCKS)
            rows = self._rows(JOINING_JOB_IDS)
        return [row["id"] for row in rows]

    def close(self) -> None:
        self._stop_thread()
        with self._exclusive():
            self._db.close()


def sqlite_path(database_url: str, media_root: Path) -> Path | str:
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `sqlite:///:memory:`; empty: the media root's."""
    if not database_url:
        return media_root / DEFAULT_DATABASE_NAME
    if not database_url.startswith(SQLITE_SCHEME) or database_url == SQLITE_SCHEME:
        raise InvalidArgument(f"database_url {database_url!r} is not a {SQLITE_SCHEME}<path> URL")
    location = database_url[len(SQLITE_SCHEME) :]
    return location if location == ":memory:" else Path(location)


def open_job_store(database_url: str, media_root: Path) -> JobStore:
    """SQLite for empty and sqlite:/// URLs, PostgreSQL for postgresql:// (and postgres://) URLs."""
    if database_url.startswith(POSTGRES_SCHEMES):
        return PostgresJobStore(database_url, media_root)
    if database_url and not database_url.startswith("sqlite:"):
        # Only the scheme: the rest of the URL may hold a password.
        scheme = database_url.split(":", 1)[0]
        raise InvalidArgument(
            f"database_url scheme {scheme!r} is not supported: use {SQLITE_SCHEME}<path>, "
            f"{POSTGRES_SCHEMES[0]}user@host/database, or leave it empty for {DEFAULT_DATABASE_NAME} "
            "in the media root"
        )
    path = sqlite_path(database_url, media_root)
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteJobStore(path, media_root)

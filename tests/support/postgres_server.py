"""A real PostgreSQL server on loopback for tests: its own cluster in a temporary folder, a free port,
trust authentication, one database per caller, stopped at the end of the pytest session.

Debian's `postgresql` package (installed by the Makefile) puts initdb and postgres under
/usr/lib/postgresql/<version>/bin; its systemd service plays no part. PostgreSQL refuses to run as root,
so under root the cluster belongs to, and the server runs as, the `postgres` user the package creates.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from services.triton.server_process import free_ports

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVICE_USER = "postgres"
SUPERUSER = "postgres"
LOOPBACK = "127.0.0.1"
POLL_SECONDS = 0.05
_START_ATTEMPTS = 3
_LOG_TAIL_CHARS = 4000
_SERVER_KEY = pytest.StashKey["PostgresServer"]()


class PostgresError(RuntimeError):
    """The cluster could not be made, or the server did not start."""


def postgres_bin_dir() -> Path:
    candidates = sorted(Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")), key=lambda path: int(path.parent.name))
    if not candidates:
        raise PostgresError(f"no {POSTGRES_BIN_GLOB}: install Debian's postgresql package (`make install` does)")
    return candidates[-1]


@dataclass(frozen=True)
class _RunAs:
    """Who runs initdb and postgres: the service user under root, else whoever runs the tests."""

    uid: int | None
    gid: int | None

    @staticmethod
    def for_this_process() -> _RunAs:
        if os.geteuid() != 0:
            return _RunAs(None, None)
        entry = pwd.getpwnam(SERVICE_USER)
        return _RunAs(entry.pw_uid, entry.pw_gid)

    def own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def popen(self, command: Sequence[str], log_path: Path, cwd: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log_stream:
            return subprocess.Popen(
                command,
                stdout=log_stream,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                user=self.uid,
                group=self.gid,
                extra_groups=[] if self.uid is not None else None,
                # Its own process group: a Ctrl-C in the terminal reaches pytest, which then stops it.
                start_new_session=True,
            )


def _log_tail(log_path: Path) -> str:
    if not log_path.exists():
        return ""
    return log_path.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL_CHARS:]


class PostgresServer:
    """A started server; `create_database` gives each caller an empty database and its URL."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path, root: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.root = root

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    def accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> str:
        """A fresh database (any earlier one of that name is dropped); its URL."""
        database = re.sub(r"\W", "_", name).lower()[:63]
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        return self.url(database)

    def empty_tables(self, url: str) -> None:
        """Removes every row of every table in the database's public schema, restarting identities."""
        with psycopg.connect(url, autocommit=True) as connection:
            rows = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
            if rows:
                tables = sql.SQL(", ").join(sql.Identifier(row[0]) for row in rows)
                connection.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(tables))

    def stop(self, timeout_seconds: float = 10.0) -> None:
        if self.process.poll() is None:
            # SIGINT is PostgreSQL's fast shutdown: it ends client sessions instead of waiting for them.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _init_cluster(root: Path, run_as: _RunAs) -> Path:
    data_dir = root / "data"
    log_path = root / "initdb.log"
    command = [
        str(postgres_bin_dir() / "initdb"),
        f"--pgdata={data_dir}",
        f"--username={SUPERUSER}",
        "--auth=trust",
        "--encoding=UTF8",
        "--no-sync",
    ]
    process = run_as.popen(command, log_path, cwd=root)
    if process.wait(60) != 0:
        raise PostgresError(f"initdb exited with {process.returncode}:\n{_log_tail(log_path)}")
    return data_dir


def _start_once(root: Path, data_dir: Path, run_as: _RunAs, attempt: int, timeout_seconds: float) -> PostgresServer:
    (port,) = free_ports(1)
    log_path = root / f"postgres-{attempt}.log"
    command = [
        str(postgres_bin_dir() / "postgres"),
        "-D",
        str(data_dir),
        "-h",
        LOOPBACK,
        "-p",
        str(port),
        "-k",
        str(root),
        # A throwaway cluster: durability would only slow the tests down.
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
    ]
    server = PostgresServer(run_as.popen(command, log_path, cwd=root), port, log_path, root)
    deadline = time.monotonic() + timeout_seconds
    while not server.accepts_connections():
        if server.process.poll() is not None:
            raise PostgresError(f"postgres exited with {server.process.returncode}:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            server.process.kill()
            server.process.wait()
            raise PostgresError(
                f"postgres not accepting connections within {timeout_seconds} s:\n{_log_tail(log_path)}"
            )
        time.sleep(POLL_SECONDS)
    return server


def start_postgres(startup_timeout_seconds: float = 30.0) -> PostgresServer:
    """A new cluster in a new temporary folder and its server; `stop()` removes both."""
    run_as = _RunAs.for_this_process()
    root = Path(tempfile.mkdtemp(prefix="swapline-postgres-"))
    try:
        run_as.own(root)
        data_dir = _init_cluster(root, run_as)
        for attempt in range(_START_ATTEMPTS - 1):
            try:
                return _start_once(root, data_dir, run_as, attempt, startup_timeout_seconds)
            except PostgresError as error:
                # The free port can be taken between probing and binding; anything else is final.
                if "could not bind" not in str(error):
                    raise
        return _start_once(root, data_dir, run_as, _START_ATTEMPTS - 1, startup_timeout_seconds)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def session_postgres(config: pytest.Config) -> PostgresServer:
    """The pytest session's one server, started by the first caller and stopped when the session ends.

    Kept in the config's stash rather than in a session fixture so that every test module can share it
    without a conftest: a fixture imported into two modules would start two servers.
    """
    server = config.stash.get(_SERVER_KEY, None)
    if server is None:
        server = start_postgres()
        config.stash[_SERVER_KEY] = server
        config.add_cleanup(server.stop)
    return server

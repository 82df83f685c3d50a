"""Starts the embedded stack's services as child processes and keeps them running.

A thread per child waits on it; when it dies it is started again with the same environment, its
port pinned to the one it first bound (its Unix socket path is in the environment already), so
its clients reconnect to the same address. A child that keeps crashing is restarted with growing
delays, never in a spin. tritonserver is supervised the same way through EmbeddedTriton.

Each child runs in a session of its own; an orphan reaper (orphan_reaper.py) is told every child's process
group, and ends those still running if this process dies without stopping them (SIGKILL, say).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.cli import orphan_reaper
from services.common.errors import DeadlineExceeded, NotFound, SwaplineError, Unavailable
from services.triton.server_process import EmbeddedTriton

log = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
TRITON_NAME = "tritonserver"
_LISTENING = re.compile(r"listening on (?P<host>[^\s:]+):(?P<port>\d+)")

# A crashed child comes back after half a second; each crash soon after a restart doubles the wait.
FIRST_RESTART_DELAY_SECONDS = 0.5
MAX_RESTART_DELAY_SECONDS = 30.0
# A child that ran this long before dying was not crash-looping: its next restart is quick again.
STABLE_RUN_SECONDS = 30.0
# tritonserver is watched through EmbeddedTriton.alive(), which asks the server, so it is polled.
TRITON_POLL_SECONDS = 1.0


def restart_delay(consecutive_crashes: int) -> float:
    """Seconds before restart number `consecutive_crashes` (1-based) of a child that keeps crashing."""
    return min(MAX_RESTART_DELAY_SECONDS, FIRST_RESTART_DELAY_SECONDS * 2.0 ** max(consecutive_crashes - 1, 0))


def next_crash_count(previous: int, ran_seconds: float) -> int:
    """Consecutive crashes, counting this one: a child that ran long enough starts the count again."""
    return 1 if ran_seconds >= STABLE_RUN_SECONDS else previous + 1


@dataclass(frozen=True)
class ServiceRestart:
    """One restart the supervisor made: which child, how its predecessor ended, and its restart count."""

    name: str
    exit_code: int | None
    count: int

    def describe(self) -> str:
        exit_text = "exit unknown" if self.exit_code is None else f"exit {self.exit_code}"
        return f"restarted {self.name} ({exit_text}), restart {self.count}"


def _drain(stream: IO[str], sink: IO[str], lines: queue.Queue[str | None]) -> None:
    with sink:
        for line in stream:
            sink.write(line)
            sink.flush()
            lines.put(line)
    lines.put(None)


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[str]
    log_path: Path
    address: str = ""
    started_at: float = field(default_factory=time.monotonic)
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def wait_listening(self, timeout: float) -> str:
        """Blocks until the service prints its bound address; fails with its log if it dies first."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise Unavailable(f"{self.name} did not start within {timeout:.0f} s; log: {self.log_path}") from None
            if line is None:
                raise Unavailable(f"{self.name} exited with {self.process.wait()} during start:\n{self.log_tail()}")
            match = _LISTENING.search(line)
            if match:
                self.address = f"{match['host']}:{match['port']}"
                return self.address

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# Two malloc arenas: glibc otherwise keeps one per thread that ever allocated (8 per core), and a burst of
# jobs decoding images on the gateway's thread pool left it holding 130 MB more than before the burst.
SERVICE_PROCESS_ENV = {"PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "2"}


def service_env_prefix(name: str) -> str:
    """`worker-1` -> SWAPLINE_WORKER_: a service's settings prefix, from its name in the stack."""
    return f"SWAPLINE_{name.split('-')[0].upper()}_"


def start_service(name: str, env: Mapping[str, str], log_dir: Path) -> ServiceProcess:
    """`python -m services.<name without -N>`, its output appended to log_dir/<name>.log."""
    log_path = log_dir / f"{name}.log"
    sink = log_path.open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{name.split('-')[0]}"],
        env={**os.environ, **SERVICE_PROCESS_ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPOSITORY_ROOT,
        start_new_session=True,
    )
    service = ServiceProcess(name=name, process=process, log_path=log_path)
    assert process.stdout is not None
    threading.Thread(target=_drain, args=(process.stdout, sink, service._lines), daemon=True).start()
    return service


class OrphanReaper:
    """The reaper process and the pipe to it; what it is told is lost, not raised, if it has died."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", orphan_reaper.__name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=REPOSITORY_ROOT,
            # Not in the CLI's process group: a signal sent to that whole group must not end the reaper too.
            start_new_session=True,
        )
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _tell(self, verb: str, argument: int | Path | None = None) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        with self._lock:
            try:
                stdin.write(f"{verb} {argument}\n" if argument is not None else f"{verb}\n")
                stdin.flush()
            except (BrokenPipeError, ValueError):
                log.warning("the orphan reaper is gone; children may outlive a killed CLI")

    def watch(self, group: int) -> None:
        self._tell(orphan_reaper.WATCH, group)

    def forget(self, group: int) -> None:
        self._tell(orphan_reaper.FORGET, group)

    def remove(self, directory: Path) -> None:
        self._tell(orphan_reaper.REMOVE, directory)

    def close(self) -> None:
        """Every child has been stopped: the reaper leaves without ending anything."""
        self._tell(orphan_reaper.DONE)
        with self._lock:
            assert self._process.stdin is not None
            self._process.stdin.close()
        self._process.wait()


class ProcessSupervisor:
    """The stack's children by name; `on_restart` is called, from a supervisor thread, when one serves again."""

    def __init__(
        self, log_dir: Path, startup_timeout: float, on_restart: Callable[[ServiceRestart], None] | None = None
    ) -> None:
        self.log_dir = log_dir
        self.startup_timeout = startup_timeout
        self._on_restart = on_restart
        self._stopping = threading.Event()
        # Guards _services, _ready_pids and _restarts; notified whenever a child serves again.
        self._changed = threading.Condition()
        self._services: dict[str, ServiceProcess] = {}
        # The environment each service was started with, its port pinned to the one it first bound.
        self._envs: dict[str, dict[str, str]] = {}
        self._ready_pids: dict[str, int] = {}
        self._restarts: dict[str, int] = {}
        self._triton: EmbeddedTriton | None = None
        self._threads: list[threading.Thread] = []
        # Services whose restart waits: an operator (or a test) holds them down for an outage.
        self._held: set[str] = set()
        # Started with the first child; told of every child from then on, until stop().
        self._reaper: OrphanReaper | None = None

    def _reaper_started(self) -> OrphanReaper:
        if self._reaper is None:
            self._reaper = OrphanReaper()
        return self._reaper

    @property
    def reaper_pid(self) -> int | None:
        """The orphan reaper's process, once the first child has started (None before)."""
        return self._reaper.pid if self._reaper is not None else None

    def remove_if_killed(self, directory: Path) -> None:
        """Has the orphan reaper remove `directory` (one the children use) if this process dies before stop()."""
        self._reaper_started().remove(directory)

    def _watch(self, pid: int) -> None:
        if self._reaper is not None:
            self._reaper.watch(pid)

    def _forget(self, pid: int) -> None:
        if self._reaper is not None:
            self._reaper.forget(pid)

    def start(self, envs: Mapping[str, Mapping[str, str]]) -> dict[str, ServiceProcess]:
        """Starts these services together, waits until each listens, then supervises them."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._reaper_started()
        started = {name: start_service(name, env, self.log_dir) for name, env in envs.items()}
        for service in started.values():
            self._watch(service.process.pid)
        with self._changed:
            self._services.update(started)
        for name, service in started.items():
            service.wait_listening(self.startup_timeout)
            log.info("%s at %s", name, service.address)
            port = service.address.rsplit(":", 1)[1]
            self._envs[name] = {**envs[name], f"{service_env_prefix(name)}PORT": port}
            self._mark_serving(name, service.process.pid)
            self._spawn(name, self._supervise_service)
        return started

    def supervise_triton(self, triton: EmbeddedTriton) -> None:
        """Watches a started tritonserver and restarts it (same ports) once its process has exited."""
        pid = triton.pid
        assert pid is not None
        self._triton = triton
        self._reaper_started()
        self._watch(pid)
        self._mark_serving(TRITON_NAME, pid)
        self._spawn(TRITON_NAME, self._supervise_triton)

    def service(self, name: str) -> ServiceProcess:
        with self._changed:
            if name not in self._services:
                raise NotFound(f"no service {name[:40]!r} in this stack")
            return self._services[name]

    def names(self) -> list[str]:
        with self._changed:
            return [*self._services, *([TRITON_NAME] if self._triton is not None else [])]

    def pid(self, name: str) -> int:
        """The current process id of a service, or of tritonserver."""
        if name == TRITON_NAME:
            pid = self._triton.pid if self._triton is not None else None
            if pid is None:
                raise NotFound("tritonserver is not running in this stack")
            return pid
        return self.service(name).process.pid

    def restarts(self) -> dict[str, int]:
        """How many times each child has been restarted, by name."""
        with self._changed:
            return {name: self._restarts.get(name, 0) for name in self.names()}

    def metrics_address(self, name: str) -> str:
        """host:port of a service's Prometheus endpoint (pinned at start, so it survives restarts)."""
        env = self._envs.get(name, {})
        prefix = service_env_prefix(name)
        port = env.get(f"{prefix}METRICS_PORT", "0")
        if int(port) <= 0:
            raise NotFound(f"{name[:40]!r} has no fixed metrics port in this stack")
        return f"{env.get(f'{prefix}HOST', '127.0.0.1')}:{port}"

    @contextmanager
    def held(self, name: str) -> Iterator[None]:
        """While inside, `name` is not restarted when it exits: an outage that lasts as long as the block."""
        with self._changed:
            self._held.add(name)
        try:
            yield
        finally:
            with self._changed:
                self._held.discard(name)
                self._changed.notify_all()

    def wait_restarted(self, name: str, previous_pid: int, timeout: float) -> int:
        """Blocks until `name` runs as a process other than `previous_pid` and serves again; returns its pid."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._ready_pids.get(name, previous_pid) != previous_pid, timeout):
                raise DeadlineExceeded(f"{name} was not restarted and serving within {timeout:.0f} s")
            return self._ready_pids[name]

    def stop(self, timeout: float) -> None:
        """Supervision ends first (a child that exits from now on stays down), then SIGTERM, then SIGKILL.

        tritonserver is left to its owner; a restart of it in progress is waited for rather than raced.
        """
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
            services = list(self._services.values())
        for service in reversed(services):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in reversed(services):
            try:
                service.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not drain in %.0f s; killing it", service.name, timeout)
                service.process.kill()
                service.process.wait()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        with self._changed:
            self._services.clear()
            self._triton = None
        # Every child has been stopped; tritonserver's owner stops it next.
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None

    def _mark_serving(self, name: str, pid: int) -> None:
        with self._changed:
            self._ready_pids[name] = pid
            self._changed.notify_all()

    def _spawn(self, name: str, loop: Callable[[str], None]) -> None:
        thread = threading.Thread(target=loop, args=(name,), name=f"supervise-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    @contextmanager
    def _restart_slot(self, name: str, crashes: int) -> Iterator[int | None]:
        """Backs off, then holds the lock while the restart is counted and its process registered.

        Gives None instead when the stack is stopping. stop() sets _stopping before it reads the services
        under the same lock, so a process registered inside the slot is one that stop() terminates.
        """
        if self._stopping.wait(restart_delay(crashes)):
            yield None
            return
        with self._changed:
            if self._stopping.is_set():
                yield None
                return
            self._restarts[name] = self._restarts.get(name, 0) + 1
            yield self._restarts[name]

    def _restarted(self, restart: ServiceRestart, pid: int) -> None:
        self._mark_serving(restart.name, pid)
        log.info("%s", restart.describe())
        if self._on_restart is not None:
            self._on_restart(restart)

    def _supervise_service(self, name: str) -> None:
        crashes = 0
        while True:
            service = self.service(name)
            exit_code = service.process.wait()
            self._forget(service.process.pid)
            with self._changed:
                self._changed.wait_for(lambda: name not in self._held or self._stopping.is_set())
            if self._stopping.is_set():
                return
            ran_seconds = time.monotonic() - service.started_at
            crashes = next_crash_count(crashes, ran_seconds)
            log.warning(
                "%s exited with %d after %.1f s; restarting it in %.1f s",
                name,
                exit_code,
                ran_seconds,
                restart_delay(crashes),
            )
            with self._restart_slot(name, crashes) as count:
                if count is None:
                    return
                replacement = start_service(name, self._envs[name], self.log_dir)
                self._watch(replacement.process.pid)
                # Its port is pinned, so its address is known before it listens.
                replacement.address = service.address
                self._services[name] = replacement
            try:
                replacement.wait_listening(self.startup_timeout)
            except Unavailable as error:
                if not self._stopping.is_set():
                    log.warning("restart %d of %s failed: %s", count, name, error.message)
                    replacement.process.kill()
                continue
            self._restarted(ServiceRestart(name, exit_code, count), replacement.process.pid)

    def _supervise_triton(self, name: str) -> None:
        triton = self._triton
        assert triton is not None
        crashes = 0
        started_at = time.monotonic()
        watched_pid = triton.pid
        while not self._stopping.wait(TRITON_POLL_SECONDS):
            if triton.alive():
                continue
            ran_seconds = time.monotonic() - started_at
            crashes = next_crash_count(crashes, ran_seconds)
            # alive() has logged the exit code and cleaned up after the server already.
            log.warning("%s is down after %.1f s; restarting it in %.1f s", name, ran_seconds, restart_delay(crashes))
            with self._restart_slot(name, crashes) as count:
                if count is None:
                    return
            started_at = time.monotonic()
            try:
                # Blocks until the models are ready again.
                triton.restart()
            except SwaplineError as error:
                log.warning("restart %d of %s failed: %s", count, name, error.message)
                continue
            pid = triton.pid
            assert pid is not None
            if watched_pid is not None:
                self._forget(watched_pid)
            self._watch(pid)
            watched_pid = pid
            self._restarted(ServiceRestart(name, None, count), pid)

"""A real Prometheus server on loopback for tests: its own config, data dir and free port, stopped after.

Debian's `prometheus` package (installed by the Makefile) provides the binary; its systemd service plays
no part, because every server started here reads only the config written into the test's folder.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMETHEUS_BINARY = "prometheus"
LOOPBACK = "127.0.0.1"
POLL_SECONDS = 0.2
_START_ATTEMPTS = 3
_LOG_TAIL_CHARS = 4000

Sample = dict[str, Any]


class PrometheusError(RuntimeError):
    """The server did not start, a query failed, or a condition was not met before its deadline."""


@dataclass(frozen=True)
class ScrapeJob:
    name: str
    targets: tuple[str, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def prometheus_config(jobs: Sequence[ScrapeJob], rule_files: Sequence[Path], interval_seconds: float) -> str:
    """The config as JSON, which Prometheus reads as YAML."""
    interval = f"{int(interval_seconds * 1000)}ms"
    return json.dumps(
        {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(path.resolve()) for path in rule_files],
            "scrape_configs": [
                {
                    "job_name": job.name,
                    "metrics_path": job.metrics_path,
                    "honor_labels": True,
                    "static_configs": [{"targets": list(job.targets), "labels": dict(job.labels)}],
                }
                for job in jobs
            ],
        },
        indent=2,
    )


def _get_json(url: str, timeout_seconds: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as error:
        # The API answers a bad query with 400 and a JSON body naming the problem.
        detail = error.read().decode("utf-8", "replace")
        raise PrometheusError(f"{url} answered {error.code}: {detail}") from error
    if body.get("status") != "success":
        raise PrometheusError(f"{url} answered {body}")
    return body


class PrometheusServer:
    """A started server; `query` runs an instant PromQL query through /api/v1/query."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL_CHARS:]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/-/ready", timeout=1.0) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def query(self, expression: str) -> list[Sample]:
        url = f"{self.base_url}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
        data = _get_json(url, timeout_seconds=5.0)["data"]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expression!r} gave a {data['resultType']}, not an instant vector")
        result: list[Sample] = data["result"]
        return result

    def wait_for(
        self,
        expression: str,
        condition: Callable[[list[Sample]], bool] = bool,
        timeout_seconds: float = 30.0,
    ) -> list[Sample]:
        """Polls `expression` until `condition` holds for its result (by default: any series)."""
        deadline = time.monotonic() + timeout_seconds
        result = self.query(expression)
        while not condition(result):
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"{expression!r} did not meet its condition within {timeout_seconds} s; last result: {result}"
                )
            time.sleep(POLL_SECONDS)
            result = self.query(expression)
        return result

    def stop(self, timeout_seconds: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def prometheus_binary() -> str:
    binary = shutil.which(PROMETHEUS_BINARY)
    if binary is None:
        raise PrometheusError(
            f"no {PROMETHEUS_BINARY!r} on PATH: install Debian's prometheus package (`make install` does)"
        )
    return binary


def _start_once(workdir: Path, config_path: Path, attempt: int, timeout_seconds: float) -> PrometheusServer:
    port = free_loopback_port()
    log_path = workdir / f"prometheus-{attempt}.log"
    with log_path.open("wb") as log_stream:
        process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ],
            stdout=log_stream,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(process, port, log_path)
    deadline = time.monotonic() + timeout_seconds
    while not server.ready():
        if process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop()
            raise PrometheusError(f"prometheus not ready within {timeout_seconds} s:\n{server.log_tail()}")
        time.sleep(POLL_SECONDS)
    return server


@contextmanager
def running_prometheus(
    workdir: Path,
    jobs: Sequence[ScrapeJob],
    rule_files: Sequence[Path] = (),
    interval_seconds: float = 1.0,
    startup_timeout_seconds: float = 30.0,
) -> Iterator[PrometheusServer]:
    """Starts Prometheus scraping `jobs` (and evaluating `rule_files`) every `interval_seconds`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(prometheus_config(jobs, rule_files, interval_seconds), encoding="utf-8")
    server: PrometheusServer | None = None
    for attempt in range(_START_ATTEMPTS):
        try:
            server = _start_once(workdir, config_path, attempt, startup_timeout_seconds)
            break
        except PrometheusError as error:
            # The free port can be taken between probing and binding; anything else is final.
            if "address already in use" not in str(error) or attempt == _START_ATTEMPTS - 1:
                raise
    assert server is not None
    try:
        yield server
    finally:
        server.stop()

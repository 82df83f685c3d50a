from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge

from services.exporter.http_server import ExporterHttpServer


def status_of(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


@pytest.mark.parametrize(("healthy", "expected"), [(True, 200), (False, 503)])
def test_healthz_reports_the_sampling_loop(healthy: bool, expected: int) -> None:
    registry = CollectorRegistry()
    Gauge("probe_value", "a probe", registry=registry).set(3)
    server = ExporterHttpServer("127.0.0.1", 0, registry, lambda: healthy)
    server.start()
    try:
        health = status_of(f"http://127.0.0.1:{server.port}/healthz")
        metrics = status_of(f"http://127.0.0.1:{server.port}/metrics?name[]=ignored")
    finally:
        server.stop()

    assert health[0] == expected
    assert metrics[0] == 200
    assert b"probe_value 3.0" in metrics[1]
    assert metrics[2].startswith("text/plain; version=")

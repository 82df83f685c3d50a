"""Autoscaling, checked for real: two gateway processes share one PostgreSQL job store, the real Prometheus
scrapes both, and the chart's own worker-scaling queries (KEDA's trigger, prometheus-adapter's rule, the
dashboard's panel) evaluate to the open backlog, pending plus leased chunks, counted once.

The store is changed from this process, as another gateway would change it: only the gateways' periodic
refresh from the store can bring those changes to their gauges.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli.process_supervisor import ServiceProcess, start_service
from services.gateway.postgres_job_store import PostgresJobStore
from tests.deploy.chart_render import NAMESPACE, component_name, named, of_kind, scenario_objects
from tests.gateway.gateway_fakes import job_record, planned_chunks
from tests.support.postgres_server import session_postgres
from tests.support.prometheus_server import (
    PrometheusServer,
    Sample,
    ScrapeJob,
    free_loopback_port,
    running_prometheus,
)

GATEWAYS = 2
REFRESH_SECONDS = 0.5
SCRAPE_SECONDS = 0.5
START_SECONDS = 60.0
WAIT_SECONDS = 30.0
OPEN_CHUNKS = "swapline_gateway_chunks_open"
# Matchers a namespaced HPA in the release's namespace gets from prometheus-adapter (<<.LabelMatchers>>).
HPA_LABEL_MATCHERS = f'namespace="{NAMESPACE}"'
LEASE_NEVER_LAPSES = 1e12


def keda_worker_query() -> str:
    scaled = named(scenario_objects("gpu-keda"), "ScaledObject", component_name("worker"))
    (query,) = [
        trigger["metadata"]["query"] for trigger in scaled["spec"]["triggers"] if trigger["type"] == "prometheus"
    ]
    return str(query)


def adapter_worker_query() -> str:
    """The External rule's metricsQuery as prometheus-adapter sends it for the worker's HPA."""
    config_map = named(scenario_objects("gpu-hpa"), "ConfigMap", component_name("prometheus-adapter"))
    rules = yaml.safe_load(config_map["data"]["config.yaml"])["externalRules"]
    (rule,) = [rule for rule in rules if rule["seriesQuery"].startswith(OPEN_CHUNKS)]
    query = str(rule["metricsQuery"]).replace("<<.Series>>", OPEN_CHUNKS)
    query = query.replace("<<.LabelMatchers>>", HPA_LABEL_MATCHERS)
    assert "<<" not in query, query
    return query


def dashboard_backlog_query() -> str:
    config_map = next(
        item
        for item in of_kind(scenario_objects("monitoring-on"), "ConfigMap")
        if "swapline-dashboard.json" in item.get("data", {})
    )
    dashboard = json.loads(config_map["data"]["swapline-dashboard.json"])
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if OPEN_CHUNKS in target["expr"]
    ]
    (expression,) = expressions
    return str(expression)


def value(samples: list[Sample]) -> float | None:
    """The value of a one-series answer; None for an empty one."""
    if not samples:
        return None
    (sample,) = samples
    return float(sample["value"][1])


def by_state(samples: list[Sample]) -> dict[str, float]:
    return {sample["metric"]["state"]: float(sample["value"][1]) for sample in samples}


def wait_for_value(prometheus: PrometheusServer, query: str, expected: float) -> None:
    prometheus.wait_for(query, lambda samples: value(samples) == expected, timeout_seconds=WAIT_SECONDS)


def wait_for_every_gateway(prometheus: PrometheusServer, counts: dict[str, int]) -> None:
    """Until every gateway's last scrape reports these counts by state: one that still reports an earlier state
    of the store (its sum unchanged, chunks only moved from PENDING to LEASED) would make the max per state
    count a chunk twice for a refresh interval."""
    for state, count in counts.items():
        query = f'count({OPEN_CHUNKS}{{namespace="{NAMESPACE}", state="{state}"}} == {count})'
        wait_for_value(prometheus, query, GATEWAYS)


@pytest.fixture(scope="module")
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    url = session_postgres(request.config).create_database(request.module.__name__)
    yield url


@pytest.fixture
def store(database: str, tmp_path: Path) -> Iterator[PostgresJobStore]:
    """This process's connection: it creates the tables before the gateways start, then changes jobs."""
    opened = PostgresJobStore(database, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def gateway_metrics(store: PostgresJobStore, database: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two gateway processes on the one database; the addresses of their metrics endpoints."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    ports = [free_loopback_port() for _ in range(GATEWAYS)]
    gateways: list[ServiceProcess] = []
    try:
        for number, port in enumerate(ports, start=1):
            env = {
                "SWAPLINE_GATEWAY_HOST": "127.0.0.1",
                "SWAPLINE_GATEWAY_PORT": "0",
                "SWAPLINE_GATEWAY_INTERNAL_PORT": "0",
                "SWAPLINE_GATEWAY_METRICS_PORT": str(port),
                "SWAPLINE_GATEWAY_DRAIN_SECONDS": "0",
                "SWAPLINE_GATEWAY_TRANSPORT_SECURITY": "plaintext",
                "SWAPLINE_GATEWAY_AUTH_MODE": "open",
                "SWAPLINE_GATEWAY_MEDIA_ROOT": str(tmp_path / "media"),
                "SWAPLINE_GATEWAY_DATABASE_URL": database,
                "SWAPLINE_GATEWAY_STORE_COUNTS_REFRESH_SECONDS": str(REFRESH_SECONDS),
                # Never dialled: no job here is probed, detected or joined.
                "SWAPLINE_GATEWAY_DECODER_TARGET": "127.0.0.1:1",
                "SWAPLINE_GATEWAY_DETECTOR_TARGET": "127.0.0.1:1",
                "SWAPLINE_GATEWAY_ENCODER_TARGET": "127.0.0.1:1",
            }
            gateways.append(start_service(f"gateway-{number}", env, log_dir))
        for gateway in gateways:
            gateway.wait_listening(START_SECONDS)
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for gateway in gateways:
            gateway.process.terminate()
        for gateway in gateways:
            gateway.process.wait(timeout=30)


def test_the_chart_queries_count_the_open_backlog_once(
    store: PostgresJobStore, gateway_metrics: list[str], tmp_path: Path
) -> None:
    queries = {"KEDA trigger": keda_worker_query(), "prometheus-adapter rule": adapter_worker_query()}
    dashboard = dashboard_backlog_query()
    for query in queries.values():
        assert HPA_LABEL_MATCHERS in query, query
    scrape = ScrapeJob("swapline-gateway", tuple(gateway_metrics), labels={"namespace": NAMESPACE})
    with running_prometheus(tmp_path / "prometheus", [scrape], interval_seconds=SCRAPE_SECONDS) as prometheus:
        # Both gateways are scraped, each reporting the whole (still empty) store.
        prometheus.wait_for(
            f"count by (instance) ({OPEN_CHUNKS})", lambda samples: len(samples) == GATEWAYS, WAIT_SECONDS
        )

        # Job a: 3 chunks, job b: 2; two leases take a's first chunks. Open: 3 PENDING, 2 LEASED.
        store.add_job(job_record("a", 1.0), planned_chunks("a", [10, 10, 10]))
        store.add_job(job_record("b", 2.0), planned_chunks("b", [10, 10]))
        for worker in ("w1", "w2"):
            assert store.lease_next_chunk(worker, f"lease-{worker}", 10.0, LEASE_NEVER_LAPSES) is not None

        # Each gateway reports all 5 open chunks: summing the replicas would count them twice.
        wait_for_every_gateway(prometheus, {"PENDING": 3, "LEASED": 2})
        assert value(prometheus.query(f'sum({OPEN_CHUNKS}{{namespace="{NAMESPACE}"}})')) == 2 * 5
        results: dict[str, Any] = {name: value(prometheus.query(query)) for name, query in queries.items()}
        assert results == {name: 5 for name in queries}, queries
        assert by_state(prometheus.query(dashboard)) == {"PENDING": 3, "LEASED": 2}, dashboard

        # Job b is cancelled (on "another gateway"): its 2 pending chunks leave the backlog, the leases stay.
        assert store.transition_job("b", ("QUEUED", "RUNNING"), "CANCELLED", 11.0)
        wait_for_every_gateway(prometheus, {"PENDING": 1, "LEASED": 2})
        assert value(prometheus.query(f'sum({OPEN_CHUNKS}{{namespace="{NAMESPACE}"}})')) == 2 * 3
        results = {name: value(prometheus.query(query)) for name, query in queries.items()}
        assert results == {name: 3 for name in queries}, queries
        assert by_state(prometheus.query(dashboard)) == {"PENDING": 1, "LEASED": 2}, dashboard

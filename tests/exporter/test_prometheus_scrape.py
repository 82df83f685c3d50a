"""A real Prometheus server scrapes a running exporter that replays a recording, and evaluates the rules."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.gateway.gpu_trend_source import PrometheusTrendSource, latest_per_gpu
from tests.exporter.telemetry_fixtures import GIB, gpu_sample, record, sweep
from tests.support.prometheus_server import (
    POLL_SECONDS,
    PrometheusServer,
    Sample,
    ScrapeJob,
    free_loopback_port,
    running_prometheus,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = REPO_ROOT / "deploy" / "monitoring" / "swapline-alerts.yaml"
EXPORTER_JOB = "swapline-exporter"
NODE = "scrape-test-node"
STARTUP_SECONDS = 30.0
# The GPU rule group runs every 5 s, so a rule result can take that long after the first scrape.
RULE_RESULT_SECONDS = 20.0

SATURATED = gpu_sample(
    0,
    utilization_percent=98.5,
    memory_used_bytes=72 * GIB,
    memory_total_bytes=80 * GIB,
    temperature_celsius=66.0,
)
IDLE = gpu_sample(
    1,
    uuid="GPU-11111111-2222-3333-4444-555555555555",
    utilization_percent=12.0,
    memory_used_bytes=8 * GIB,
    memory_total_bytes=80 * GIB,
    temperature_celsius=41.0,
    # A GPU without NVENC: the exporter leaves the series out.
    encoder_utilization_percent=None,
)
RECORDED = (SATURATED, IDLE)


@dataclass(frozen=True)
class RunningExporter:
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningExporter]:
    tmp_path = tmp_path_factory.mktemp("exporter")
    # The same two GPUs in every sweep, so every scrape sees the same values whatever sweep it lands on.
    recording = record(tmp_path / "recording.jsonl", [sweep(RECORDED) for _ in range(3)])
    port = free_loopback_port()
    environment = {
        **os.environ,
        "SWAPLINE_EXPORTER_REPLAY": str(recording),
        "SWAPLINE_EXPORTER_HOST": "127.0.0.1",
        "SWAPLINE_EXPORTER_PORT": str(port),
        "SWAPLINE_EXPORTER_TREND_DIR": str(tmp_path / "trend"),
        "SWAPLINE_EXPORTER_NODE_NAME": NODE,
        "SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION": "false",
    }
    log_path = tmp_path / "exporter.log"
    with log_path.open("wb") as log_stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.exporter"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log_stream,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(f"http://127.0.0.1:{port}/healthz"):
            log = log_path.read_text(errors="replace")
            assert process.poll() is None, f"exporter exited with {process.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"exporter not healthy within {STARTUP_SECONDS} s:\n{log}"
            time.sleep(POLL_SECONDS)
        yield RunningExporter(process, f"127.0.0.1:{port}", log_path)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# One exporter and one server for the module: Prometheus takes about 5 s to start its first scrape.
@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, exporter: RunningExporter) -> Iterator[PrometheusServer]:
    # `node` as a target label too, as the chart's ServiceMonitor relabels it from the pod's node name.
    job = ScrapeJob(EXPORTER_JOB, (exporter.address,), labels={"node": NODE})
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), [job], rule_files=[RULES_FILE]) as server:
        yield server


def _by_gpu(result: list[Sample]) -> dict[str, Sample]:
    return {sample["metric"]["gpu"]: sample for sample in result}


def test_prometheus_scrapes_the_exporter_target_as_up(prometheus: PrometheusServer, exporter: RunningExporter) -> None:
    result = prometheus.wait_for(f'up{{job="{EXPORTER_JOB}"}} == 1', timeout_seconds=STARTUP_SECONDS)

    assert [sample["metric"]["instance"] for sample in result] == [exporter.address]
    assert result[0]["metric"]["node"] == NODE


def test_query_returns_the_recorded_gpus_with_their_labels_and_values(prometheus: PrometheusServer) -> None:
    result = prometheus.wait_for(
        f'swapline_gpu_utilization_percent{{job="{EXPORTER_JOB}"}}',
        lambda samples: len(samples) == len(RECORDED),
        timeout_seconds=STARTUP_SECONDS,
    )

    by_gpu = _by_gpu(result)
    assert sorted(by_gpu) == [str(sample.index) for sample in RECORDED]
    for sample in RECORDED:
        series = by_gpu[str(sample.index)]
        assert series["metric"]["uuid"] == sample.uuid
        assert series["metric"]["model"] == sample.model
        assert series["metric"]["node"] == NODE
        assert float(series["value"][1]) == pytest.approx(sample.utilization_percent)


def test_rules_evaluate_on_the_exporters_series(prometheus: PrometheusServer) -> None:
    """The rules file's label matching works on what the exporter really exports, not only on test input."""
    ratios = prometheus.wait_for(
        "swapline:gpu_memory_used:ratio",
        lambda samples: len(samples) == len(RECORDED),
        timeout_seconds=RULE_RESULT_SECONDS,
    )
    by_gpu = _by_gpu(ratios)
    for sample in RECORDED:
        expected = sample.memory_used_bytes / sample.memory_total_bytes
        assert float(by_gpu[str(sample.index)]["value"][1]) == pytest.approx(expected)

    saturated = prometheus.wait_for('ALERTS{alertname="SwaplineGpuSaturated"}', timeout_seconds=RULE_RESULT_SECONDS)
    assert [(series["metric"]["gpu"], series["metric"]["uuid"]) for series in saturated] == [
        (str(SATURATED.index), SATURATED.uuid)
    ]
    assert prometheus.query('ALERTS{alertname="SwaplineGpuNvmlDown"}') == []


def test_the_gateways_prometheus_source_reads_every_reading_a_job_report_charts(prometheus: PrometheusServer) -> None:
    """Cluster job reports read the GPUs back from Prometheus: NVDEC and NVENC too, not only the SMs."""
    prometheus.wait_for(
        f'swapline_gpu_decoder_utilization_percent{{job="{EXPORTER_JOB}"}}',
        lambda samples: len(samples) == len(RECORDED),
        timeout_seconds=STARTUP_SECONDS,
    )
    source = PrometheusTrendSource(prometheus.base_url, f'job="{EXPORTER_JOB}"')
    now = time.time()

    latest = {row.gpu_index: row for row in latest_per_gpu(asyncio.run(source.window(now - 30.0, now)))}

    assert sorted(latest) == [sample.index for sample in RECORDED]
    for sample in RECORDED:
        row = latest[sample.index]
        assert (row.node, row.gpu_uuid, row.gpu_model) == (NODE, sample.uuid, sample.model)
        assert row.utilization_percent == pytest.approx(sample.utilization_percent)
        assert row.memory_used_bytes == sample.memory_used_bytes
        assert row.decoder_utilization_percent == pytest.approx(sample.decoder_utilization_percent)
    assert latest[SATURATED.index].encoder_utilization_percent == pytest.approx(SATURATED.encoder_utilization_percent)
    assert math.isnan(latest[IDLE.index].encoder_utilization_percent)

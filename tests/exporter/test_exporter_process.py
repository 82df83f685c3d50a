"""Starts the real exporter process on a replayed recording, beside a fake kubelet, and talks HTTP to it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.exporter.fake_kubelet import Container, Devices, FakeKubelet, Pod, serving
from tests.exporter.telemetry_fixtures import gpu_process, gpu_sample, record, sweep

REPO_ROOT = Path(__file__).resolve().parents[2]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_exporter_process_serves_metrics_and_healthz_from_a_replay(tmp_path: Path) -> None:
    recording = record(
        tmp_path / "rec.jsonl",
        [sweep([gpu_sample(0), gpu_sample(1)], [gpu_process(1, 4242)], driver_version="550.54.15")],
    )
    (tmp_path / "pod-resources").mkdir()
    socket_path = tmp_path / "pod-resources" / "kubelet.sock"
    env = {
        **os.environ,
        "SWAPLINE_EXPORTER_HOST": "127.0.0.1",
        "SWAPLINE_EXPORTER_PORT": "0",
        "SWAPLINE_EXPORTER_REPLAY": str(recording),
        "SWAPLINE_EXPORTER_TREND_DIR": str(tmp_path / "trend"),
        "SWAPLINE_EXPORTER_NODE_NAME": "replay-node",
        "SWAPLINE_EXPORTER_INTERVAL_SECONDS": "0.2",
        "SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION": "true",
        "SWAPLINE_EXPORTER_POD_RESOURCES_SOCKET": str(socket_path),
    }
    triton = Container("triton", (Devices("nvidia.com/gpu", (gpu_sample(1).uuid,)),))
    with serving(FakeKubelet((Pod("swapline", "triton-0", (triton,)),)), socket_path):
        process = subprocess.Popen(
            [sys.executable, "-m", "services.exporter"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            match = re.search(r"exporter listening on 127\.0\.0\.1:(\d+)", line)
            assert match, f"unexpected first line {line!r}"
            base = f"http://127.0.0.1:{match.group(1)}"

            health_status, health_body = get(f"{base}/healthz")
            metrics_status, metrics_text = get(f"{base}/metrics")
            missing_status, _ = get(f"{base}/nothing-here")
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20)

    assert (health_status, health_body) == (200, "ok\n")
    assert metrics_status == 200
    assert missing_status == 404
    values = {
        (sample.name, sample.labels.get("gpu", ""), sample.labels.get("pid", "")): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    }
    assert values[("swapline_gpu_nvml_up", "", "")] == 1.0
    assert values[("swapline_gpu_utilization_percent", "0", "")] == 87.0
    assert values[("swapline_gpu_utilization_percent", "1", "")] == 88.0
    assert values[("swapline_gpu_process_memory_used_bytes", "1", "4242")] == 2 * 1024**3
    # The first sweep (before serving) asked the kubelet: GPU 1 and its process name Triton's pod.
    pods = {
        (sample.name, sample.labels["gpu"], sample.labels.get("pid", "")): (
            sample.labels["namespace"],
            sample.labels["pod"],
            sample.labels["container"],
        )
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if "pod" in sample.labels
    }
    triton_pod = ("swapline", "triton-0", "triton")
    assert pods[("swapline_gpu_pod_info", "1", "")] == triton_pod
    assert ("swapline_gpu_pod_info", "0", "") not in pods
    assert pods[("swapline_gpu_process_memory_used_bytes", "1", "4242")] == triton_pod
    assert 'node="replay-node"' in metrics_text
    assert process.returncode == 0, stderr
    trend_files = list((tmp_path / "trend").glob("gpu-trend-*.csv"))
    assert len(trend_files) == 1
    assert trend_files[0].read_text().count("replay-node") >= 2

"""GPU-to-pod attribution through the kubelet's pod-resources API, against a fake kubelet serving the real API."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from services.exporter.pod_attribution import (
    KubeletPodResources,
    PodAttributor,
    PodRef,
    attributor_for_node,
    holders_of,
)
from tests.exporter.fake_kubelet import Container, Devices, FakeKubelet, Pod, serving
from tests.exporter.telemetry_fixtures import FakeClock, gpu_sample

GPU_0 = gpu_sample(0).uuid
GPU_1 = gpu_sample(1).uuid
TRITON = PodRef(namespace="swapline", pod="triton-0", container="triton")
WORKER = PodRef(namespace="swapline", pod="worker-a", container="worker")
NOTEBOOK = PodRef(namespace="lab", pod="notebook", container="jupyter")

NODE_PODS = (
    Pod(
        "swapline",
        "triton-0",
        (Container("triton", (Devices("nvidia.com/gpu", (GPU_0,)),)), Container("residency")),
    ),
    # Two containers share GPU 1 by time-slicing: the device plugin names each replica <uuid>::<n>.
    Pod("swapline", "worker-a", (Container("worker", (Devices("nvidia.com/gpu", (f"{GPU_1}::0",)),)),)),
    Pod(
        "lab",
        "notebook",
        (
            Container(
                "jupyter",
                (Devices("nvidia.com/gpu.shared", (f"{GPU_1}::1",)), Devices("example.com/fpga", ("fpga-3",))),
            ),
        ),
    ),
    # A MIG device is listed by its own UUID, and other resources by their own ids: no GPU of NVML's.
    Pod("ml", "train", (Container("train", (Devices("nvidia.com/mig-1g.10gb", ("MIG-5c3e0d4a",)),)),)),
    Pod("kube-system", "cpu-pinned", (Container("app", cpu_ids=(2, 3)),)),
)
EXPECTED_HOLDERS = {GPU_0: (TRITON,), GPU_1: (NOTEBOOK, WORKER)}


def socket_in(tmp_path: Path) -> Path:
    folder = tmp_path / "pod-resources"
    folder.mkdir()
    return folder / "kubelet.sock"


def test_the_kubelet_lists_gpus_by_uuid_with_every_container_holding_them(tmp_path: Path) -> None:
    socket_path = socket_in(tmp_path)
    client = KubeletPodResources(socket_path)
    try:
        with serving(FakeKubelet(NODE_PODS), socket_path):
            holders = client.list_gpu_holders()
    finally:
        client.close()

    assert holders == EXPECTED_HOLDERS


def test_holders_are_matched_by_uuid_or_by_index() -> None:
    # The device plugin's `index` id strategy names GPUs by their NVML index instead of their UUID.
    assert holders_of({GPU_0: (TRITON,)}, gpu_sample(0)) == (TRITON,)
    assert holders_of({"1": (WORKER,)}, gpu_sample(1)) == (WORKER,)
    assert holders_of({"1": (WORKER,)}, gpu_sample(0)) == ()


def test_the_kubelet_is_asked_again_only_after_the_refresh_interval(tmp_path: Path) -> None:
    socket_path = socket_in(tmp_path)
    clock = FakeClock()
    attributor = PodAttributor(KubeletPodResources(socket_path), clock=clock, refresh_seconds=10.0)
    try:
        with serving(FakeKubelet(NODE_PODS[:1]), socket_path) as kubelet:
            assert attributor.holders() == {GPU_0: (TRITON,)}
            kubelet.pods = NODE_PODS
            clock.advance(9.0)
            assert attributor.holders() == {GPU_0: (TRITON,)}
            assert kubelet.list_calls == 1

            clock.advance(1.0)
            assert attributor.holders() == EXPECTED_HOLDERS
            assert kubelet.list_calls == 2
    finally:
        attributor.close()


def test_without_the_kubelet_gpus_go_without_pods_until_it_answers_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    socket_path = socket_in(tmp_path)
    clock = FakeClock()
    attributor = PodAttributor(KubeletPodResources(socket_path), clock=clock, refresh_seconds=10.0)
    try:
        with caplog.at_level(logging.WARNING, logger="services.exporter.pod_attribution"):
            for _ in range(3):
                assert attributor.holders() == {}
                clock.advance(10.0)
        assert len(caplog.records) == 1
        assert "pod-resources API did not answer" in caplog.records[0].getMessage()

        # The kubelet (re)starts on the same socket: the client reconnects within its capped backoff.
        with serving(FakeKubelet(NODE_PODS), socket_path):
            deadline = time.monotonic() + 15.0
            holders = attributor.holders()
            while not holders and time.monotonic() < deadline:
                clock.advance(10.0)
                holders = attributor.holders()
        assert holders == EXPECTED_HOLDERS
    finally:
        attributor.close()


def test_attribution_is_off_when_disabled_or_off_a_kubernetes_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    socket_path = socket_in(tmp_path)
    with caplog.at_level(logging.INFO, logger="services.exporter.pod_attribution"):
        assert attributor_for_node(False, socket_path) is None
        assert attributor_for_node(True, tmp_path / "absent" / "kubelet.sock") is None
    assert len(caplog.records) == 2
    assert all(record.getMessage().startswith("pod attribution is off") for record in caplog.records)

    # On a node the folder is there even while the kubelet restarts and its socket is briefly gone.
    attributor = attributor_for_node(True, socket_path)
    assert attributor is not None
    attributor.close()

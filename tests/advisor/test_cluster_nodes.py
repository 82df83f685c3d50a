"""The cluster's GPU nodes, read with the official Kubernetes client from a fake API server, and shown beside
the recommendations and the fleet report."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import tomllib
from pathlib import Path

import grpc
import pytest

from services.advisor.__main__ import background_loops
from services.advisor.advisor_state import AdvisorState
from services.advisor.cluster_inventory import LatestInventory, catalog_gpu_for_product
from services.advisor.cluster_nodes import (
    KubernetesNodeReader,
    in_cluster_configuration,
    refresh_cluster,
    refresh_cluster_forever,
)
from services.advisor.settings import ENV_PREFIX, AdvisorSettings
from services.common.errors import InvalidArgument
from services.common.gpu_catalog import load_catalog
from services.common.settings_loader import load_settings
from swapline.advisor.v1 import advisor_pb2, advisor_pb2_grpc
from swapline.jobs.v1 import jobs_pb2_grpc
from tests.advisor.fake_kubernetes_api import FakeKubernetesApi, node, serving
from tests.advisor.test_servicer import _run

PACKAGED = load_catalog()
# Two L4 nodes, one GPU the catalog lacks (one of its eight GPUs unhealthy), a CPU node, and a node whose GPUs
# GPU feature discovery has not labelled.
CLUSTER = [
    node("gpu-l4-a", product="NVIDIA-L4", gpus=4, index=1),
    node("cpu-a", index=2),
    node("gpu-b200-a", product="NVIDIA-B200", gpus=8, allocatable_gpus=7, index=3),
    node("gpu-l4-b", product="NVIDIA-L4", gpus=4, index=4),
    node("gpu-unlabelled", gpus=2, index=5),
]
# The servicer tests' catalog (Big, Cheap, Small): the cluster has Cheap, and a GPU the catalog lacks.
SERVICER_CLUSTER = [
    node("gpu-cheap", product="NVIDIA-Cheap", gpus=3, index=1),
    node("gpu-b200", product="NVIDIA-B200", gpus=8, index=2),
    node("cpu", index=3),
]


@pytest.mark.parametrize(
    ("product", "catalog_gpu"),
    [
        ("NVIDIA-L4", "L4 24GB"),
        ("Tesla-T4", "T4 16GB"),
        ("NVIDIA-A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA-A100-80GB-PCIe", "A100 80GB"),
        ("NVIDIA-H100-80GB-HBM3", "H100 80GB SXM"),
        ("NVIDIA-GeForce-RTX-4090", "RTX 4090 24GB"),
        # Time-slicing shares the same GPU; a MIG slice has a fraction of its memory.
        ("NVIDIA-L4-SHARED", "L4 24GB"),
        ("NVIDIA-A100-SXM4-80GB-MIG-1g.10gb", None),
        ("NVIDIA-B200", None),
        ("", None),
    ],
)
def test_gpu_feature_discovery_products_map_to_the_packaged_catalog(product: str, catalog_gpu: str | None) -> None:
    gpu = catalog_gpu_for_product(product, PACKAGED)
    assert (gpu.name if gpu else None) == catalog_gpu


def test_the_inventory_lists_every_gpu_node_page_by_page_and_keeps_unknown_products() -> None:
    api = FakeKubernetesApi(CLUSTER)

    async def read() -> LatestInventory:
        latest = LatestInventory(enabled=True)
        with serving(api) as configuration:
            reader = KubernetesNodeReader(lambda: configuration, timeout_seconds=5.0, page_size=2)
            await refresh_cluster(latest, reader, PACKAGED)
        return latest

    before = time.time()
    inventory = asyncio.run(read()).inventory

    # Five nodes at two a page: three requests, each continuing where the last ended.
    assert [(query["limit"], query.get("continue")) for query in api.queries] == [
        (["2"], None),
        (["2"], ["2"]),
        (["2"], ["4"]),
    ]
    assert inventory.enabled and inventory.error == ""
    assert inventory.read_at >= before
    assert [(g.product, g.catalog_gpu, g.nodes, g.capacity, g.allocatable) for g in inventory.gpus] == [
        ("NVIDIA-B200", "", 1, 8, 7),
        ("NVIDIA-L4", "L4 24GB", 2, 8, 8),
        ("", "", 1, 2, 2),
    ]
    assert [group.summary for group in inventory.gpus] == [
        "8 x NVIDIA-B200 on 1 node (not in the catalog)",
        "8 x NVIDIA-L4 on 2 nodes (L4 24GB in the catalog)",
        "2 x GPU without a nvidia.com/gpu.product label on 1 node (not in the catalog)",
    ]
    assert inventory.gpus_of("L4 24GB") == 8
    assert inventory.gpus_of("T4 16GB") == 0


def test_a_failing_api_is_reported_and_the_last_read_kept() -> None:
    api = FakeKubernetesApi(CLUSTER, script=["nodes", 403, 500])

    async def read() -> list[tuple[str, float, int]]:
        latest = LatestInventory(enabled=True)
        seen = []
        with serving(api) as configuration:
            reader = KubernetesNodeReader(lambda: configuration, timeout_seconds=5.0)
            for _ in range(3):
                inventory = await refresh_cluster(latest, reader, PACKAGED)
                seen.append((inventory.error, inventory.read_at, inventory.gpus_of("L4 24GB")))
        return seen

    (ok, forbidden, broken) = asyncio.run(read())

    assert ok[0] == "" and ok[1] > 0 and ok[2] == 8
    assert forbidden[0] == (
        "the Kubernetes API answered 403 Forbidden (the advisor's ServiceAccount needs nodes get and list: "
        "the chart's advisor.clusterNodes.enabled)"
    )
    assert broken[0] == "the Kubernetes API answered 500 Internal Server Error"
    # The GPUs and the time of the last good read stay.
    assert forbidden[1:] == broken[1:] == ok[1:]


def test_an_api_that_does_not_answer_fails_within_the_timeout() -> None:
    api = FakeKubernetesApi(CLUSTER, script=["hang"])

    async def read() -> tuple[str, float]:
        latest = LatestInventory(enabled=True)
        with serving(api) as configuration:
            reader = KubernetesNodeReader(lambda: configuration, timeout_seconds=0.3)
            started = time.monotonic()
            inventory = await refresh_cluster(latest, reader, PACKAGED)
            return inventory.error, time.monotonic() - started

    error, seconds = asyncio.run(read())

    assert error.startswith("could not reach the Kubernetes API")
    assert "timed out" in error
    # One request, no retries: the next refresh is the retry.
    assert len(api.queries) == 1
    assert seconds < 3.0


def test_outside_a_cluster_the_in_cluster_reader_reports_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    latest = LatestInventory(enabled=True)
    reader = KubernetesNodeReader(in_cluster_configuration, timeout_seconds=1.0)

    inventory = asyncio.run(refresh_cluster(latest, reader, PACKAGED))

    assert inventory.enabled and inventory.gpus == () and inventory.read_at == 0
    assert inventory.error == "no in-cluster Kubernetes configuration: Service host/port is not set."


def test_the_refresh_loop_logs_a_run_of_failures_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    # Two failures, a good read, then a request that waits: when it arrives, the loop has stored the good read.
    api = FakeKubernetesApi(CLUSTER, script=[403, 403, "nodes", "hang"])
    latest = LatestInventory(enabled=True)

    async def loop() -> None:
        with serving(api) as configuration:
            reader = KubernetesNodeReader(lambda: configuration, timeout_seconds=5.0)
            task = asyncio.create_task(refresh_cluster_forever(latest, reader, PACKAGED, 0.01))
            try:
                assert await asyncio.to_thread(api.wait_for_requests, 4, 10.0)
            finally:
                task.cancel()

    with caplog.at_level(logging.INFO, logger="services.advisor.cluster_nodes"):
        asyncio.run(loop())

    inventory = latest.inventory
    assert inventory.error == "" and inventory.gpus_of("L4 24GB") == 8
    messages = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert [level for level, _ in messages] == ["WARNING", "INFO"]
    assert "403 Forbidden" in messages[0][1]
    assert messages[1][1] == "read the cluster's GPU nodes again"


def test_the_fleet_report_and_recommendations_show_the_clusters_gpus_beside_every_catalog_gpu() -> None:
    async def scenario(stub: advisor_pb2_grpc.AdvisorServiceStub, state: AdvisorState, advisor: str) -> None:
        before = await stub.FleetReport(advisor_pb2.FleetReportRequest(limit=10))
        with serving(FakeKubernetesApi(SERVICER_CLUSTER)) as configuration:
            reader = KubernetesNodeReader(lambda: configuration, timeout_seconds=5.0)
            await refresh_cluster(state.cluster, reader, state.catalog)
        fleet = await stub.FleetReport(advisor_pb2.FleetReportRequest(limit=10))
        wide = await stub.RecommendForJob(advisor_pb2.RecommendForJobRequest(job_id="wide"))
        small = await stub.RecommendForJob(advisor_pb2.RecommendForJobRequest(job_id="small"))

        # Before any read (this advisor starts with the cluster off) the field stays unset: job reports are as before.
        assert not before.HasField("cluster")
        assert fleet.cluster.enabled and fleet.cluster.error == "" and fleet.cluster.read_at_unix_seconds > 0
        assert [(g.product, g.catalog_gpu, g.capacity) for g in fleet.cluster.gpus] == [
            ("NVIDIA-B200", "", 8),
            ("NVIDIA-Cheap", "Cheap", 3),
        ]
        assert [g.summary for g in fleet.cluster.gpus] == [
            "8 x NVIDIA-B200 on 1 node (not in the catalog)",
            "3 x NVIDIA-Cheap on 1 node (Cheap in the catalog)",
        ]
        # Every catalog GPU keeps its row, the ones the cluster lacks too; the totals do not change.
        assert {row.gpu: row.cluster_gpus for row in fleet.rows} == {"Big": 0, "Cheap": 3, "Small": 0}
        assert fleet.recommended_cost_usd == pytest.approx(before.recommended_cost_usd)

        assert wide.recommended_gpu == "Cheap" and wide.recommended_gpu_in_cluster
        assert wide.reason.endswith("cheapest that fits; the cluster has 3 of them")
        assert {option.gpu: option.cluster_gpus for option in wide.options} == {"Big": 0, "Cheap": 3, "Small": 0}
        assert [g.summary for g in wide.cluster.gpus] == [g.summary for g in fleet.cluster.gpus]
        # The cheapest GPU that fits is recommended though the cluster has none of it (its pool may be at zero).
        assert small.recommended_gpu == "Small" and not small.recommended_gpu_in_cluster
        assert small.reason.endswith("cheapest that fits; the cluster has none")

    _run(scenario)


def test_the_settings_choose_whether_the_advisor_reads_the_cluster() -> None:
    base = {f"{ENV_PREFIX}GATEWAY_TARGET": "127.0.0.1:1"}
    off = load_settings(AdvisorSettings, ENV_PREFIX, base)
    on = load_settings(AdvisorSettings, ENV_PREFIX, {**base, f"{ENV_PREFIX}CLUSTER_NODES": "in_cluster"})
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        disabled = AdvisorState.from_settings(off, stub)
        enabled = AdvisorState.from_settings(on, stub)

    assert off.cluster_nodes == "off" and not disabled.cluster.inventory.enabled
    assert len(background_loops(disabled)) == 1
    assert enabled.cluster.inventory.enabled and len(background_loops(enabled)) == 2
    with pytest.raises(InvalidArgument, match="CLUSTER_NODES='kubeconfig' is not one of off, in_cluster"):
        load_settings(AdvisorSettings, ENV_PREFIX, {**base, f"{ENV_PREFIX}CLUSTER_NODES": "kubeconfig"})
    with pytest.raises(InvalidArgument, match="CLUSTER_NODES_TIMEOUT_SECONDS=0"):
        load_settings(AdvisorSettings, ENV_PREFIX, {**base, f"{ENV_PREFIX}CLUSTER_NODES_TIMEOUT_SECONDS": "0"})


def test_the_kubernetes_client_is_a_core_dependency_pinned_for_the_image() -> None:
    # The image installs the core dependencies only: in an extra, in_cluster would fail on its import.
    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in project["dependencies"]]
    assert "kubernetes" in names
    assert re.search(r"^kubernetes==\S+$", (root / "constraints.txt").read_text(), re.MULTILINE)

"""The exporter's DaemonSet on a GPU cluster, and the gateway reading its series back from Prometheus.

The exporter reaches NVML through the NVIDIA runtime, runs on GPU nodes however they are labelled,
attributes GPUs to pods through the kubelet's pod-resources socket (no host PID namespace, no Kubernetes
API access, no RBAC), and the gateway charts each job's GPUs from Prometheus wherever Prometheus scrapes
the exporter.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import helm_python
import pytest

from services.common.settings_loader import load_settings
from services.gateway.gateway_parts import open_gpu_trend_source
from services.gateway.gpu_trend_source import PrometheusTrendSource
from services.gateway.settings import GatewaySettings
from tests.deploy.chart_render import (
    CHART_DIR,
    Manifest,
    containers_of,
    env_values,
    objects_of,
    pod_spec,
    render,
    scenario_names,
    scenario_objects,
    workload_of,
)
from tests.deploy.test_chart_network_policies import PROMETHEUS, reachable_outside
from tests.deploy.test_chart_settings import runtime_environment

SCENARIOS = ["default", *scenario_names()]
EXPORTER_SCENARIOS = [name for name in SCENARIOS if name != "cpu-minimal"]
KUBELET_POD_RESOURCES = "/var/lib/kubelet/pod-resources"
# Nodes as GPU feature discovery, GKE, a hand-labelled cluster and a CPU pool label them.
GFD_NODE = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-L4"}
PRODUCT_ONLY_NODE = {"nvidia.com/gpu.product": "NVIDIA-A10G"}
GKE_NODE = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
HAND_LABELLED_NODE = {"example.com/gpu-node": "true"}
CPU_NODE = {"kubernetes.io/os": "linux"}


def render_objects(values: Mapping[str, Any]) -> list[Manifest]:
    return objects_of(render(values))


def term_matches(term: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for requirement in term.get("matchExpressions", []):
        key, operator = requirement["key"], requirement["operator"]
        if operator == "Exists":
            matched = key in labels
        elif operator == "In":
            matched = labels.get(key) in requirement["values"]
        else:
            raise AssertionError(f"operator {operator} is not modelled here")
        if not matched:
            return False
    return True


def schedules_on(pod: Manifest, labels: Mapping[str, str]) -> bool:
    """Whether the scheduler would place the pod on a node with these labels (nodeSelector and nodeAffinity)."""
    if any(labels.get(key) != value for key, value in pod.get("nodeSelector", {}).items()):
        return False
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    return required is None or any(term_matches(term, labels) for term in required["nodeSelectorTerms"])


def exporter_container(pod: Manifest) -> Manifest:
    (container,) = pod["containers"]
    return container


@pytest.mark.parametrize("scenario", EXPORTER_SCENARIOS)
def test_the_exporter_runs_on_gpu_nodes_labelled_by_gfd_or_the_cloud_and_nowhere_else(scenario: str) -> None:
    pod = pod_spec(scenario_objects(scenario), "exporter")

    assert schedules_on(pod, GFD_NODE)
    assert schedules_on(pod, PRODUCT_ONLY_NODE)
    assert schedules_on(pod, GKE_NODE)
    assert not schedules_on(pod, CPU_NODE)
    assert not schedules_on(pod, {"nvidia.com/gpu.present": "false"})
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    container = exporter_container(pod)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    node_name = next(item for item in container["env"] if item["name"] == "SWAPLINE_EXPORTER_NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # Every writable path the exporter uses is a volume.
    env = env_values(container)
    mounts = {mount["mountPath"] for mount in container["volumeMounts"] if not mount.get("readOnly")}
    assert any(env["SWAPLINE_EXPORTER_TREND_DIR"].startswith(mount + "/") for mount in mounts)


def test_gpu_nodes_labelled_by_other_means_join_with_a_term_and_a_selector_narrows_them() -> None:
    hand_labelled = {"matchExpressions": [{"key": "example.com/gpu-node", "operator": "In", "values": ["true"]}]}
    with helm_python.Chart.load(CHART_DIR) as chart:
        default_terms = chart.values["exporter"]["gpuNodeSelectorTerms"]
    widened = pod_spec(
        render_objects({"exporter": {"gpuNodeSelectorTerms": [*default_terms, hand_labelled]}}), "exporter"
    )
    assert schedules_on(widened, HAND_LABELLED_NODE)
    assert schedules_on(widened, GFD_NODE)

    narrowed = pod_spec(render_objects({"exporter": {"nodeSelector": {"pool": "video"}}}), "exporter")
    assert schedules_on(narrowed, {**GFD_NODE, "pool": "video"})
    assert not schedules_on(narrowed, GFD_NODE)


def test_a_node_affinity_of_ones_own_replaces_the_gpu_node_terms() -> None:
    own = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "example.com/gpu-node", "operator": "Exists"}]}]
        }
    }
    pod = pod_spec(render_objects({"exporter": {"affinity": {"nodeAffinity": own}}}), "exporter")
    assert pod["affinity"]["nodeAffinity"] == own
    assert schedules_on(pod, HAND_LABELLED_NODE)
    assert not schedules_on(pod, GFD_NODE)


def test_the_exporter_asks_for_the_nvidia_runtime_unless_told_otherwise() -> None:
    assert pod_spec(scenario_objects("default"), "exporter")["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in pod_spec(render_objects({"exporter": {"runtimeClassName": ""}}), "exporter")
    custom = render_objects({"exporter": {"runtimeClassName": "nvidia-cdi"}})
    assert pod_spec(custom, "exporter")["runtimeClassName"] == "nvidia-cdi"


@pytest.mark.parametrize("scenario", EXPORTER_SCENARIOS)
def test_attribution_reads_the_kubelets_socket_read_only_without_host_pids_or_api_access(scenario: str) -> None:
    objects = scenario_objects(scenario)
    pod = pod_spec(objects, "exporter")
    container = exporter_container(pod)
    env = env_values(container)

    assert env["SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION"] == "true"
    socket_folder = str(PurePosixPath(env["SWAPLINE_EXPORTER_POD_RESOURCES_SOCKET"]).parent)
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == socket_folder]
    assert mount["readOnly"] is True
    (volume,) = [volume for volume in pod["volumes"] if "hostPath" in volume]
    assert volume["name"] == mount["name"]
    assert volume["hostPath"] == {"path": KUBELET_POD_RESOURCES, "type": "Directory"}
    for host_namespace in ("hostPID", "hostIPC", "hostNetwork"):
        assert not pod.get(host_namespace, False), host_namespace
    assert pod["automountServiceAccountToken"] is False
    assert not [item for item in objects if item["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role")]
    assert all(item["automountServiceAccountToken"] is False for item in objects if item["kind"] == "ServiceAccount")


def test_without_attribution_nothing_comes_from_the_host() -> None:
    # Pod Security "baseline" then admits the exporter: no hostPath, no host namespaces, no privilege.
    pod = pod_spec(render_objects({"exporter": {"podAttribution": {"enabled": False}}}), "exporter")
    container = exporter_container(pod)

    assert env_values(container)["SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION"] == "false"
    assert not [volume for volume in pod["volumes"] if "hostPath" in volume]
    assert not [mount for mount in container["volumeMounts"] if mount["mountPath"] == KUBELET_POD_RESOURCES]
    assert not container["securityContext"].get("privileged", False)
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_a_kubelet_with_another_root_directory_is_found_through_the_values() -> None:
    microk8s = "/var/snap/microk8s/common/var/lib/kubelet/pod-resources"
    pod = pod_spec(render_objects({"exporter": {"podAttribution": {"podResourcesDir": microk8s}}}), "exporter")
    (volume,) = [volume for volume in pod["volumes"] if "hostPath" in volume]
    assert volume["hostPath"]["path"] == microk8s
    socket = env_values(exporter_container(pod))["SWAPLINE_EXPORTER_POD_RESOURCES_SOCKET"]
    (mount,) = [mount for mount in exporter_container(pod)["volumeMounts"] if mount["name"] == volume["name"]]
    assert socket == f"{mount['mountPath']}/kubelet.sock"


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"exporter": {"gpuNodeSelectorTerms": []}}, "/exporter/gpuNodeSelectorTerms"),
        ({"exporter": {"hostPID": True}}, "additional properties 'hostPID' not allowed"),
        ({"exporter": {"rbac": {"create": True}}}, "additional properties 'rbac' not allowed"),
        ({"exporter": {"runtimeClassName": "Not A Name"}}, "/exporter/runtimeClassName"),
        ({"monitoring": {"prometheus": {"url": "prometheus:9090"}}}, "/monitoring/prometheus/url"),
    ],
)
def test_the_schema_refuses_what_the_exporter_no_longer_takes_and_bad_values(values: dict[str, Any], path: str) -> None:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    assert path in str(caught.value)


# The gateway's GPU trend source: where the chart reads it (item 5 of issue 13).


def gateway_settings(objects: list[Manifest]) -> GatewaySettings:
    (container,) = containers_of(workload_of(objects, "gateway"))
    return load_settings(GatewaySettings, "SWAPLINE_GATEWAY_", runtime_environment(container))


@pytest.mark.parametrize(
    ("scenario", "url"),
    [
        ("gpu-keda", "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"),
        # gpu-hpa leaves autoscaling.keda alone: the Prometheus Operator's own Service by default.
        ("gpu-hpa", "http://prometheus-operated.monitoring.svc:9090"),
    ],
)
def test_with_a_monitor_the_gateway_charts_job_gpus_from_prometheus(scenario: str, url: str) -> None:
    objects = scenario_objects(scenario)
    settings = gateway_settings(objects)

    assert (settings.gpu_trend_source, settings.prometheus_url) == ("prometheus", url)
    assert isinstance(open_gpu_trend_source(settings), PrometheusTrendSource)
    assert reachable_outside(objects, PROMETHEUS, 9090) == {"gateway"}


def test_a_prometheus_url_alone_points_the_gateway_there() -> None:
    url = "http://prometheus.observability.svc:9090"
    objects = render_objects({"monitoring": {"prometheus": {"url": url}}})
    settings = gateway_settings(objects)
    assert (settings.gpu_trend_source, settings.prometheus_url) == ("prometheus", url)
    assert reachable_outside(objects, PROMETHEUS, 9090) == {"gateway"}


@pytest.mark.parametrize(
    "values",
    [
        {},
        # No exporter, no GPU series to read.
        {"monitoring": {"serviceMonitor": {"enabled": True}}, "exporter": {"enabled": False}},
        # The values' own choice wins: none turns the chart off.
        {"monitoring": {"serviceMonitor": {"enabled": True}}, "gateway": {"settings": {"gpu_trend_source": "none"}}},
    ],
    ids=["no-prometheus", "no-exporter", "turned-off"],
)
def test_without_a_scraped_exporter_or_when_turned_off_the_gateway_reads_no_prometheus(
    values: dict[str, Any],
) -> None:
    objects = render_objects(values)
    assert gateway_settings(objects).gpu_trend_source == "none"
    assert reachable_outside(objects, PROMETHEUS, 9090) == set()


def test_a_url_of_the_chart_and_one_of_the_settings_are_not_both_taken() -> None:
    values = {
        "monitoring": {"serviceMonitor": {"enabled": True}},
        "gateway": {"settings": {"prometheus_url": "http://elsewhere:9090"}},
    }
    with pytest.raises(helm_python.HelmError, match="SWAPLINE_GATEWAY_PROMETHEUS_URL"):
        render(values)

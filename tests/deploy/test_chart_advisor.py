"""advisor.clusterNodes: the advisor reads the cluster's GPU nodes with nodes get/list, its own token and an
egress to the Kubernetes API; without it, no RBAC, no token and no way to the API."""

from __future__ import annotations

import functools
import posixpath
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.config import incluster_config

from services.advisor.settings import ENV_PREFIX, AdvisorSettings
from services.common.settings_loader import load_settings
from tests.deploy.chart_render import (
    KUBERNETES_VERSION,
    NAMESPACE,
    Manifest,
    component_name,
    containers_of,
    env_values,
    named,
    objects_of,
    of_kind,
    pod_spec,
    render,
    scenario_names,
    scenario_objects,
    workloads,
)
from tests.deploy.test_chart_network_policies import API_SERVER, BUCKET, reachable_outside
from tests.deploy.test_chart_settings import runtime_environment
from tests.deploy.test_values_schema import render_error

SCENARIOS = ["default", *scenario_names()]
CLUSTER_NODES = {"advisor": {"clusterNodes": {"enabled": True}}}
RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# Where the Kubernetes client's in-cluster configuration reads the token and the CA.
TOKEN_FOLDER = posixpath.dirname(incluster_config.SERVICE_TOKEN_FILENAME)
API_PORTS = (443, 6443)


@functools.cache
def _enabled_objects(api_cidr: str = "") -> tuple[Manifest, ...]:
    values: dict[str, Any] = {**CLUSTER_NODES}
    if api_cidr:
        values["networkPolicy"] = {"kubernetesApi": {"cidrs": [api_cidr]}}
    return tuple(objects_of(render(values)))


def enabled_objects(api_cidr: str = "") -> list[Manifest]:
    return list(_enabled_objects(api_cidr))


def token_mounts(objects: list[Manifest]) -> dict[str, list[str]]:
    """Per component, the volumes mounted where the Kubernetes client looks for a token."""
    mounts: dict[str, list[str]] = {}
    for workload in workloads(objects):
        component = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in containers_of(workload):
            for mount in container.get("volumeMounts", []):
                if mount["mountPath"] == TOKEN_FOLDER:
                    mounts.setdefault(component, []).append(mount["name"])
    return mounts


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_without_cluster_nodes_there_is_no_rbac_no_token_and_no_way_to_the_api(scenario: str) -> None:
    objects = scenario_objects(scenario)

    assert [item for item in objects if item["kind"] in RBAC_KINDS] == []
    assert token_mounts(objects) == {}
    assert all(
        workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for workload in workloads(objects)
    )
    if of_kind(objects, "NetworkPolicy"):
        # (object-storage opens 443 to Triton for its bucket, wherever that is.)
        for port in API_PORTS:
            assert "advisor" not in reachable_outside(objects, API_SERVER, port), port
    advisors = [item for item in workloads(objects) if item["metadata"]["name"] == component_name("advisor")]
    for advisor in advisors:
        (container,) = containers_of(advisor)
        assert env_values(container)["SWAPLINE_ADVISOR_CLUSTER_NODES"] == "off"


def test_the_advisor_may_get_and_list_nodes_and_nothing_else() -> None:
    objects = enabled_objects()
    name = f"{component_name('advisor')}-{NAMESPACE}"
    role = named(objects, "ClusterRole", name)
    binding = named(objects, "ClusterRoleBinding", name)
    pod = pod_spec(objects, "advisor")

    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}]
    assert [item["metadata"]["name"] for item in objects if item["kind"] in RBAC_KINDS] == [name, name]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    named(objects, "ServiceAccount", pod["serviceAccountName"])


def test_only_the_advisor_mounts_a_token_where_the_client_reads_it() -> None:
    objects = enabled_objects()
    pod = pod_spec(objects, "advisor")
    (container,) = pod["containers"]
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == TOKEN_FOLDER]
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    files = {}
    for source in volume["projected"]["sources"]:
        if "serviceAccountToken" in source:
            files[source["serviceAccountToken"]["path"]] = "token"
        for item in source.get("configMap", {}).get("items", []):
            files[item["path"]] = f"{source['configMap']['name']}/{item['key']}"
        for item in source.get("downwardAPI", {}).get("items", []):
            files[item["path"]] = item["fieldRef"]["fieldPath"]

    assert token_mounts(objects) == {"advisor": [mount["name"]]}
    assert mount["readOnly"] is True
    assert files == {
        posixpath.basename(incluster_config.SERVICE_TOKEN_FILENAME): "token",
        posixpath.basename(incluster_config.SERVICE_CERT_FILENAME): "kube-root-ca.crt/ca.crt",
        "namespace": "metadata.namespace",
    }
    # The token comes from that volume only: automount stays off on every pod and ServiceAccount.
    assert all(
        workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for workload in workloads(objects)
    )
    assert all(item["automountServiceAccountToken"] is False for item in of_kind(objects, "ServiceAccount"))
    settings = load_settings(AdvisorSettings, ENV_PREFIX, runtime_environment(container))
    assert settings.cluster_nodes == "in_cluster"


def test_only_the_advisor_reaches_the_kubernetes_api_and_only_its_addresses() -> None:
    for port in API_PORTS:
        assert reachable_outside(enabled_objects(), API_SERVER, port) == {"advisor"}, port
    narrowed = enabled_objects(f"{API_SERVER.ip}/32")
    assert reachable_outside(narrowed, API_SERVER, 6443) == {"advisor"}
    assert reachable_outside(narrowed, BUCKET, 443) == set()
    assert reachable_outside(narrowed, API_SERVER, 22) == set()


def test_the_chart_reading_nodes_validates_against_kubernetes_strictly() -> None:
    checked = [
        item
        for item in enabled_objects()
        if item["kind"] in ("ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy")
    ]
    for item in checked:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
    assert {item["kind"] for item in checked} >= {"ClusterRole", "ClusterRoleBinding"}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"advisor": {"clusterNodes": {"enabled": "yes"}}}, "/advisor/clusterNodes/enabled"),
        ({"advisor": {"clusterNodes": {"enabled": True, "refreshSeconds": 60}}}, "'refreshSeconds' not allowed"),
        (
            {"networkPolicy": {"kubernetesApi": {"cidrs": ["kubernetes.default"]}}},
            "/networkPolicy/kubernetesApi/cidrs/0",
        ),
        ({"networkPolicy": {"kubernetesApi": {"ports": []}}}, "/networkPolicy/kubernetesApi/ports"),
    ],
)
def test_the_schema_refuses_what_the_templates_cannot_use(values: dict[str, Any], expected: str) -> None:
    assert expected in render_error(values)

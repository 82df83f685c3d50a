"""The NetworkPolicies allow exactly swapline's flows, both ways, and deny the rest to the release's pods.

The rendered policies are evaluated the way Kubernetes does: a pod selected by a policy of a direction
accepts only what some rule of those policies allows, and a connection needs the source's egress and
the destination's ingress both. Endpoints stand in for the release's pods, clients, Prometheus, the
cluster DNS and addresses outside the cluster.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.deploy.chart_render import (
    NAMESPACE,
    Manifest,
    component_name,
    containers_of,
    named,
    of_kind,
    scenario_names,
    scenario_objects,
    workloads,
)

SCENARIOS = ["default", *scenario_names()]
POLICED_SCENARIOS = [name for name in SCENARIOS if name != "cpu-minimal"]
DNS = 53


@dataclass(frozen=True)
class Endpoint:
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = "10.244.9.9"


def namespace_endpoint(
    name: str, namespace: str, labels: Mapping[str, str], ip: str, namespace_labels: Mapping[str, str] | None = None
) -> Endpoint:
    own = {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}
    return Endpoint(name, namespace, labels, own, ip)


# A client namespace that monitoring-on's clientsFrom admits, Prometheus, the DNS, a stranger in the
# release's own namespace and addresses outside the cluster.
CLIENT = namespace_endpoint("client", "apps", {"app": "client"}, "10.244.5.1", {"swapline.io/client": "true"})
INGRESS = namespace_endpoint("ingress", "ingress-nginx", {"app": "ingress"}, "10.244.5.2")
PROMETHEUS = namespace_endpoint("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, "10.244.6.1")
KUBE_DNS = namespace_endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, "10.244.0.10")
STRANGER = namespace_endpoint("stranger", NAMESPACE, {"app": "stranger"}, "10.244.7.1")
OUTSIDERS = (CLIENT, INGRESS, PROMETHEUS, STRANGER)
DATABASE = namespace_endpoint("database", "external", {}, "10.20.3.4")
OTHER_DATABASE = namespace_endpoint("other-database", "external", {}, "10.30.3.4")
BUCKET = namespace_endpoint("bucket", "external", {}, "52.216.0.1")
API_SERVER = namespace_endpoint("api-server", "external", {}, "172.18.0.2")


def chart_endpoints(objects: list[Manifest]) -> dict[str, Endpoint]:
    endpoints = {}
    for index, workload in enumerate(workloads(objects)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        endpoints[component] = namespace_endpoint(component, NAMESPACE, labels, f"10.244.1.{index + 1}")
    return endpoints


def container_ports(objects: list[Manifest], component: str) -> dict[str, int]:
    workload = next(
        item
        for item in workloads(objects)
        if item["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    )
    return {port["name"]: port["containerPort"] for container in containers_of(workload) for port in container["ports"]}


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "the model reads matchLabels only"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def peer_matches(peer: Mapping[str, Any], policy_namespace: str, endpoint: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(endpoint.ip)
        inside = address in ipaddress.ip_network(block["cidr"])
        return inside and not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], endpoint.namespace_labels):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), endpoint.labels)


def rule_matches(
    rule: Mapping[str, Any], peers_key: str, namespace: str, peer: Endpoint, port: int, protocol: str
) -> bool:
    ports = rule.get("ports")
    if ports is not None and not any(
        item["port"] == port and item.get("protocol", "TCP") == protocol for item in ports
    ):
        return False
    peers = rule.get(peers_key)
    return peers is None or any(peer_matches(item, namespace, peer) for item in peers)


def direction_allows(
    policies: list[Manifest], pod: Endpoint, direction: str, peer: Endpoint, port: int, protocol: str
) -> bool:
    """Whether `pod`'s policies of `direction` ("Ingress" or "Egress") let `peer` through on `port`."""
    selecting = [
        policy
        for policy in policies
        if policy["metadata"]["namespace"] == pod.namespace
        and selector_matches(policy["spec"]["podSelector"], pod.labels)
        and direction in policy["spec"]["policyTypes"]
    ]
    if not selecting:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(
        rule_matches(rule, peers_key, policy["metadata"]["namespace"], peer, port, protocol)
        for policy in selecting
        for rule in policy["spec"].get(rules_key) or []
    )


def connects(policies: list[Manifest], source: Endpoint, target: Endpoint, port: int, protocol: str = "TCP") -> bool:
    return direction_allows(policies, source, "Egress", target, port, protocol) and direction_allows(
        policies, target, "Ingress", source, port, protocol
    )


def allowed_flows(objects: list[Manifest]) -> set[tuple[str, str, str]]:
    """(source, destination component, destination port name) for every source the model knows."""
    policies = of_kind(objects, "NetworkPolicy")
    endpoints = chart_endpoints(objects)
    flows = set()
    for source in [*endpoints.values(), *OUTSIDERS]:
        for target_name, target in endpoints.items():
            for port_name, port in container_ports(objects, target_name).items():
                if source is not target and connects(policies, source, target, port):
                    flows.add((source.name, target_name, port_name))
    return flows


def flows_between_components(objects: list[Manifest]) -> set[tuple[str, str, str]]:
    components = set(chart_endpoints(objects))
    return {flow for flow in allowed_flows(objects) if flow[0] in components}


# The calls swapline makes: (caller, callee, callee's port name).
SWAPLINE_CALLS = {
    ("worker", "gateway", "internal"),
    ("advisor", "gateway", "grpc"),
    ("gateway", "advisor", "grpc"),
    *{(caller, stage, "grpc") for caller in ("gateway", "worker") for stage in ("decoder", "detector", "encoder")},
    ("worker", "triton", "grpc"),
    ("detector", "triton", "grpc"),
    # Triton's model residency sidecar, which loads the models a job names.
    ("worker", "triton", "residency"),
}


def metrics_port_names(objects: list[Manifest]) -> set[tuple[str, str]]:
    return {(component, "metrics") for component in chart_endpoints(objects)}


def test_every_component_has_a_policy_governing_both_directions() -> None:
    objects = scenario_objects("default")
    for component in chart_endpoints(objects):
        policy = named(objects, "NetworkPolicy", component_name(component))
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert spec["ingress"] and spec["egress"], component


def test_a_default_deny_policy_isolates_every_pod_of_the_release() -> None:
    objects = scenario_objects("default")
    deny = named(objects, "NetworkPolicy", "demo-swapline-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for endpoint in chart_endpoints(objects).values():
        assert selector_matches(deny["spec"]["podSelector"], endpoint.labels), endpoint.name


def test_the_components_reach_exactly_their_downstreams() -> None:
    objects = scenario_objects("default")
    assert flows_between_components(objects) == SWAPLINE_CALLS


def test_with_narrowed_sources_every_flow_is_one_swapline_needs() -> None:
    objects = scenario_objects("monitoring-on")
    expected = {
        *SWAPLINE_CALLS,
        ("client", "gateway", "grpc"),
        *{("prometheus", component, port) for component, port in metrics_port_names(objects)},
    }
    assert allowed_flows(objects) == expected


def test_by_default_any_source_reaches_the_public_port_and_the_metrics_but_nothing_else() -> None:
    objects = scenario_objects("default")
    for outsider in OUTSIDERS:
        reached = {(target, port) for source, target, port in allowed_flows(objects) if source == outsider.name}
        assert reached == {("gateway", "grpc"), *metrics_port_names(objects)}, outsider.name


def test_the_decoder_accepts_only_gateway_and_worker_pods_on_its_port() -> None:
    objects = scenario_objects("monitoring-on")
    callers = {source for source, target, port in allowed_flows(objects) if (target, port) == ("decoder", "grpc")}
    assert callers == {"gateway", "worker"}


def test_the_chunk_queue_accepts_only_workers_and_the_public_port_no_worker() -> None:
    objects = scenario_objects("monitoring-on")
    flows = allowed_flows(objects)
    assert {source for source, target, port in flows if (target, port) == ("gateway", "internal")} == {"worker"}
    assert {source for source, target, port in flows if (target, port) == ("gateway", "grpc")} == {"client", "advisor"}


def test_triton_accepts_only_workers_and_the_detector() -> None:
    objects = scenario_objects("default")
    flows = allowed_flows(objects)
    assert {source for source, target, port in flows if (target, port) == ("triton", "grpc")} == {"worker", "detector"}
    assert not [flow for flow in flows if flow[1:] == ("triton", "http")]


def test_the_advisor_is_internal_only_the_gateway_calls_it_and_prometheus_scrapes_it() -> None:
    objects = scenario_objects("monitoring-on")
    reached = {(source, port) for source, target, port in allowed_flows(objects) if target == "advisor"}
    assert reached == {("gateway", "grpc"), ("prometheus", "metrics")}


def test_the_cert_manager_scenario_admits_only_the_ingress_namespace_and_prometheus_pods() -> None:
    objects = scenario_objects("cert-manager-mtls")
    flows = allowed_flows(objects)
    assert {source for source, target, port in flows if (target, port) == ("gateway", "grpc")} == {"ingress", "advisor"}
    assert {source for source, target, port in flows if port == "metrics"} == {"prometheus"}


@pytest.mark.parametrize("scenario", POLICED_SCENARIOS)
def test_every_pod_may_query_the_cluster_dns_on_port_53_only(scenario: str) -> None:
    objects = scenario_objects(scenario)
    policies = of_kind(objects, "NetworkPolicy")
    for endpoint in chart_endpoints(objects).values():
        assert connects(policies, endpoint, KUBE_DNS, DNS, "UDP"), endpoint.name
        assert connects(policies, endpoint, KUBE_DNS, DNS, "TCP"), endpoint.name
        assert not connects(policies, endpoint, KUBE_DNS, 8053), endpoint.name


def reachable_outside(objects: list[Manifest], target: Endpoint, port: int) -> set[str]:
    policies = of_kind(objects, "NetworkPolicy")
    return {
        endpoint.name for endpoint in chart_endpoints(objects).values() if connects(policies, endpoint, target, port)
    }


def test_without_external_services_nothing_leaves_the_cluster() -> None:
    objects = scenario_objects("default")
    for target, port in ((DATABASE, 5432), (BUCKET, 443), (API_SERVER, 6443), (PROMETHEUS, 9090)):
        assert reachable_outside(objects, target, port) == set(), target.name


def test_only_the_gateway_reaches_postgresql_and_only_its_subnet() -> None:
    objects = scenario_objects("postgresql")
    assert reachable_outside(objects, DATABASE, 5432) == {"gateway"}
    assert reachable_outside(objects, OTHER_DATABASE, 5432) == set()
    assert reachable_outside(objects, DATABASE, 22) == set()


def test_postgresql_without_peers_is_reachable_on_its_port_anywhere() -> None:
    objects = scenario_objects("object-storage")
    assert reachable_outside(objects, OTHER_DATABASE, 5432) == {"gateway"}


def test_the_gateway_reaches_prometheus_only_for_gpu_trends() -> None:
    assert reachable_outside(scenario_objects("monitoring-on"), PROMETHEUS, 9090) == {"gateway"}
    assert reachable_outside(scenario_objects("monitoring-on"), STRANGER, 9090) == set()
    # The chart points the gateway at the Prometheus scraping the exporter (tests/deploy/test_chart_exporter.py).
    assert reachable_outside(scenario_objects("gpu-keda"), PROMETHEUS, 9090) == {"gateway"}


def test_only_triton_reaches_its_model_bucket_and_only_with_object_storage() -> None:
    assert reachable_outside(scenario_objects("object-storage"), BUCKET, 443) == {"triton"}
    assert "triton" not in reachable_outside(scenario_objects("gpu-keda"), BUCKET, 443)


@pytest.mark.parametrize("scenario", POLICED_SCENARIOS)
def test_nothing_reaches_the_kubernetes_api(scenario: str) -> None:
    # The exporter attributes GPUs to pods through the kubelet's Unix socket, not the API.
    # (443 is open to any address for Triton's model bucket where object-storage leaves the bucket's peers empty.)
    assert reachable_outside(scenario_objects(scenario), API_SERVER, 6443) == set()


def test_disabled_policies_render_none() -> None:
    assert of_kind(scenario_objects("cpu-minimal"), "NetworkPolicy") == []


def test_without_the_advisor_nobody_is_allowed_to_reach_it() -> None:
    objects = scenario_objects("open-mode")
    flows = flows_between_components(objects)
    assert not [flow for flow in flows if "advisor" in flow[:2]]
    assert flows == {flow for flow in SWAPLINE_CALLS if "advisor" not in flow[:2]}


def test_the_model_sees_a_widened_policy() -> None:
    objects = scenario_objects("default")
    decoder = named(objects, "NetworkPolicy", component_name("decoder"))
    decoder["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app": "stranger"}}})
    assert ("stranger", "decoder", "grpc") in allowed_flows(objects)

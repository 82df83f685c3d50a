"""KEDA, Prometheus Operator and cert-manager objects, checked by hand: kubernetes-validate lacks their CRDs.

What is checked is their structure and their references to the chart's own objects (targets, selectors,
ports, queries on the metrics the services export); the CRDs' full OpenAPI schemas are not.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.chart_render import (
    Manifest,
    component_name,
    labels_match,
    of_kind,
    scenario_names,
    scenario_objects,
    workloads,
)

SCENARIOS = ["default", *scenario_names()]
API_VERSIONS = {
    "ScaledObject": "keda.sh/v1alpha1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "Certificate": "cert-manager.io/v1",
}
# cert-manager's Certificate spec fields the chart may set, and the usages it knows.
CERTIFICATE_FIELDS = {
    "secretName",
    "secretTemplate",
    "commonName",
    "dnsNames",
    "ipAddresses",
    "duration",
    "renewBefore",
    "privateKey",
    "usages",
    "issuerRef",
}
KEY_USAGES = {"digital signature", "key encipherment", "server auth", "client auth"}
DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")
# The series the autoscaling queries may use: what the gateway, Triton and the advisor export.
SCALING_SERIES = {
    "swapline_gateway_chunks_open",
    "swapline_advisor_desired_worker_replicas",
    "swapline_advisor_desired_triton_replicas",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_pending_request_count",
}


def assert_object_shape(item: Manifest) -> None:
    assert item["apiVersion"] == API_VERSIONS[item["kind"]]
    assert set(item) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", item["metadata"]["name"])
    assert len(item["metadata"]["name"]) <= 63


def query_series(query: str) -> set[str]:
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\{|\[)", query))
    return names - {"rate", "sum", "max", "clamp_min"}


def crd_objects(kind: str) -> list[tuple[str, Manifest]]:
    return [(scenario, item) for scenario in SCENARIOS for item in of_kind(scenario_objects(scenario), kind)]


def test_every_crd_kind_is_rendered_by_some_scenario() -> None:
    for kind in API_VERSIONS:
        assert crd_objects(kind), f"no scenario renders a {kind}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scaled_objects(scenario: str) -> None:
    objects = scenario_objects(scenario)
    deployments = {item["metadata"]["name"]: item for item in of_kind(objects, "Deployment")}
    for scaled in of_kind(objects, "ScaledObject"):
        assert_object_shape(scaled)
        spec = scaled["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "triggers",
            "advanced",
            "fallback",
            "idleReplicaCount",
        }
        target = spec["scaleTargetRef"]
        assert target["apiVersion"] == "apps/v1" and target["kind"] == "Deployment"
        deployment = deployments[target["name"]]
        # The autoscaler owns the replica count; a rendered one would fight it on every upgrade.
        assert "replicas" not in deployment["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert trigger["type"] in {"prometheus", "cpu"}
            metadata: dict[str, Any] = trigger["metadata"]
            assert all(isinstance(value, str) for value in metadata.values())
            if trigger["type"] == "prometheus":
                assert trigger["metricType"] in {"AverageValue", "Value"}
                assert set(metadata) == {"serverAddress", "ignoreNullValues", "query", "threshold"}
                # An unscraped signal is an error on the ScaledObject, not a zero that pins minReplicas.
                assert metadata["ignoreNullValues"] == "false"
                assert metadata["serverAddress"].startswith(("http://", "https://"))
                assert float(metadata["threshold"]) > 0
                series = query_series(metadata["query"])
                assert series and series <= SCALING_SERIES, metadata["query"]
                assert 'namespace="media"' in metadata["query"]
            else:
                assert trigger["metricType"] == "Utilization"
                assert 0 < int(metadata["value"]) <= 100
                container = deployment["spec"]["template"]["spec"]["containers"][0]
                assert "cpu" in container["resources"]["requests"]


def test_workers_scale_on_open_chunks_and_triton_on_its_queue() -> None:
    objects = scenario_objects("gpu-keda")
    scaled = {item["spec"]["scaleTargetRef"]["name"]: item for item in of_kind(objects, "ScaledObject")}
    worker_queries = [
        t["metadata"]["query"]
        for t in scaled[component_name("worker")]["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]
    assert worker_queries == ['sum(max by (state) (swapline_gateway_chunks_open{namespace="media"}))']
    triton_series = {
        series
        for trigger in scaled[component_name("triton")]["spec"]["triggers"]
        for series in query_series(trigger["metadata"].get("query", ""))
    }
    assert triton_series == {"nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"}
    for cpu_service in ("decoder", "detector", "encoder"):
        triggers = scaled[component_name(cpu_service)]["spec"]["triggers"]
        assert [trigger["type"] for trigger in triggers] == ["cpu"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_monitors_select_a_service_with_the_scraped_port(scenario: str) -> None:
    objects = scenario_objects(scenario)
    services = of_kind(objects, "Service")
    for monitor in of_kind(objects, "ServiceMonitor"):
        assert_object_shape(monitor)
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": ["media"]}
        selected = [
            service
            for service in services
            if labels_match(spec["selector"]["matchLabels"], service["metadata"]["labels"])
        ]
        scraped = {endpoint["port"] for endpoint in spec["endpoints"]}
        # Exactly one selected Service carries the scraped port: a second would scrape every pod twice.
        exposing = [service for service in selected if scraped & {port["name"] for port in service["spec"]["ports"]}]
        assert len(exposing) == 1, [service["metadata"]["name"] for service in exposing]
        assert scraped <= {port["name"] for port in exposing[0]["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert DURATION.match(endpoint["interval"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_monitors_select_pods_with_the_scraped_port(scenario: str) -> None:
    objects = scenario_objects(scenario)
    for monitor in of_kind(objects, "PodMonitor"):
        assert_object_shape(monitor)
        spec = monitor["spec"]
        selected = [
            workload
            for workload in workloads(objects)
            if labels_match(spec["selector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1
        container_ports = {
            port["name"]
            for container in selected[0]["spec"]["template"]["spec"]["containers"]
            for port in container.get("ports", [])
        }
        for endpoint in spec["podMetricsEndpoints"]:
            assert endpoint["port"] in container_ports
            assert DURATION.match(endpoint["interval"])


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_the_exporter_scrape_is_what_the_alert_rules_expect(kind: str) -> None:
    scenario = "monitoring-on" if kind == "ServiceMonitor" else "object-storage"
    monitor = next(
        item
        for item in of_kind(scenario_objects(scenario), kind)
        if item["metadata"]["name"] == component_name("exporter")
    )
    endpoints_key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    (endpoint,) = monitor["spec"][endpoints_key]
    assert endpoint["honorLabels"] is True
    # SwaplineGpuSaturated asks for 10 s above 95 %: two samples need a 5 s interval or less.
    assert endpoint["interval"] in {"1s", "2s", "5s"}
    relabel = {rule["targetLabel"]: rule for rule in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "swapline-exporter"
    assert relabel["node"]["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_prometheus_rules_hold_alerts_and_records(scenario: str) -> None:
    for rule in of_kind(scenario_objects(scenario), "PrometheusRule"):
        assert_object_shape(rule)
        groups = rule["spec"]["groups"]
        assert groups
        for group in groups:
            assert group["name"] and group["rules"]
            for entry in group["rules"]:
                assert ("alert" in entry) != ("record" in entry)
                assert isinstance(entry["expr"], str) and entry["expr"].strip()
                if "alert" in entry:
                    assert entry["labels"]["severity"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_certificates(scenario: str) -> None:
    objects = scenario_objects(scenario)
    mounted = {
        volume["secret"]["secretName"]
        for workload in workloads(objects)
        for volume in workload["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }
    for certificate in of_kind(objects, "Certificate"):
        assert_object_shape(certificate)
        spec = certificate["spec"]
        assert set(spec) <= CERTIFICATE_FIELDS
        assert spec["secretName"] in mounted
        assert set(spec["usages"]) <= KEY_USAGES
        assert DURATION.match(spec["duration"]) and DURATION.match(spec["renewBefore"])
        assert spec["privateKey"]["algorithm"] in {"RSA", "ECDSA"}
        assert set(spec["issuerRef"]) == {"name", "kind", "group"} and spec["issuerRef"]["name"]
        assert len(spec["commonName"]) <= 64
        assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) for name in spec["dnsNames"])

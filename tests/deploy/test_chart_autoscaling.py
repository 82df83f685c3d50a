"""Autoscaling that has its metrics: monitors wherever the signals come from Prometheus, prometheus-adapter
rules for every HPA signal, worker scaling on the open backlog (the series the gateway exports), and no
exporter alert without an exporter.

How the queries evaluate against real gateways and a real Prometheus: tests/gateway/test_backlog_autoscaling.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import helm_python
import pytest
import yaml

from services.gateway.job_coordinator import CHUNKS_OPEN
from services.worker.settings import WorkerSettings
from tests.deploy.chart_render import (
    NAMESPACE,
    Manifest,
    component_name,
    objects_of,
    of_kind,
    render,
    scenario_objects,
    scenario_values,
)

ADAPTER_CONFIG_MAP = component_name("prometheus-adapter")
PROMETHEUS_SCENARIOS = ("gpu-keda", "gpu-hpa")
# The components each autoscaled signal is read from, by its Prometheus series.
SIGNAL_SOURCES = {
    "swapline_gateway_chunks_open": "gateway",
    "nv_inference_pending_request_count": "triton",
    "nv_inference_queue_duration_us": "triton",
    "swapline_advisor_desired_worker_replicas": "advisor",
    "swapline_advisor_desired_triton_replicas": "advisor",
}
SERIES_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*")


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


def adapter_config(objects: list[Manifest]) -> dict[str, Any]:
    (config_map,) = [item for item in of_kind(objects, "ConfigMap") if item["metadata"]["name"] == ADAPTER_CONFIG_MAP]
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["config.yaml"])
    return config


def served_series(rules: list[dict[str, Any]]) -> set[str]:
    names = set()
    for rule in rules:
        match = SERIES_NAME.match(rule["seriesQuery"])
        assert match is not None, rule
        names.add(match.group())
    return names


def monitored_components(objects: list[Manifest]) -> set[str]:
    monitors = [*of_kind(objects, "ServiceMonitor"), *of_kind(objects, "PodMonitor")]
    return {monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for monitor in monitors}


def signal_series(objects: list[Manifest]) -> set[str]:
    """The Prometheus series the ScaledObjects query and the HPAs name."""
    series: set[str] = set()
    for scaled in of_kind(objects, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                series |= {name for name in SIGNAL_SOURCES if name in trigger["metadata"]["query"]}
    for autoscaler in of_kind(objects, "HorizontalPodAutoscaler"):
        for metric in autoscaler["spec"]["metrics"]:
            if metric["type"] in ("External", "Pods"):
                series.add(metric[metric["type"].lower()]["metric"]["name"])
    return series


@pytest.mark.parametrize("scenario", PROMETHEUS_SCENARIOS)
def test_the_prometheus_autoscaled_scenarios_monitor_every_signal_source(scenario: str) -> None:
    objects = scenario_objects(scenario)
    series = signal_series(objects)
    assert "swapline_gateway_chunks_open" in series
    sources = {SIGNAL_SOURCES[name] for name in series}
    assert sources <= monitored_components(objects), f"{scenario}: signals of {sources} but no monitor of some"


@pytest.mark.parametrize("component", ["worker", "triton"])
def test_autoscaling_on_prometheus_without_a_monitor_is_refused(component: str) -> None:
    values: dict[str, Any] = {component: {"autoscaling": {"enabled": True}}}
    if component == "triton":
        # Several Triton pods: the residency sidecar must be off for the chart to get this far.
        values["triton"]["residency"] = {"enabled": False}
    message = render_error(values)
    assert f"{component} autoscaling reads its signal from Prometheus" in message
    assert "monitoring.serviceMonitor or monitoring.podMonitor" in message


def test_an_external_prometheus_may_scrape_instead_of_the_monitors() -> None:
    values = {"autoscaling": {"prometheusScrape": "external"}, "worker": {"autoscaling": {"enabled": True}}}
    objects = objects_of(render(values))
    assert of_kind(objects, "ScaledObject")
    assert not monitored_components(objects)


def test_the_prometheus_scrape_choice_is_closed() -> None:
    message = render_error({"autoscaling": {"prometheusScrape": "annotations"}})
    assert "/autoscaling/prometheusScrape" in message


def test_cpu_autoscaling_needs_no_monitor() -> None:
    objects = objects_of(render({"decoder": {"autoscaling": {"enabled": True}}}))
    assert [scaled["spec"]["scaleTargetRef"]["name"] for scaled in of_kind(objects, "ScaledObject")] == [
        component_name("decoder")
    ]


def test_the_hpa_scenario_ships_adapter_rules_for_every_signal_its_hpas_name() -> None:
    objects = scenario_objects("gpu-hpa")
    config = adapter_config(objects)
    external = {
        metric["external"]["metric"]["name"]
        for autoscaler in of_kind(objects, "HorizontalPodAutoscaler")
        for metric in autoscaler["spec"]["metrics"]
        if metric["type"] == "External"
    }
    pods = {
        metric["pods"]["metric"]["name"]
        for autoscaler in of_kind(objects, "HorizontalPodAutoscaler")
        for metric in autoscaler["spec"]["metrics"]
        if metric["type"] == "Pods"
    }
    assert external == {"swapline_gateway_chunks_open"} and pods == {"nv_inference_pending_request_count"}
    # No `name` section: the adapter serves each metric under its series' name, which the HPAs use.
    assert served_series(config["externalRules"]) == external
    assert served_series(config["rules"]) == pods
    for rule in [*config["externalRules"], *config["rules"]]:
        assert "name" not in rule
        assert "<<.LabelMatchers>>" in rule["metricsQuery"], rule
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    (pod_rule,) = config["rules"]
    assert pod_rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_the_adapter_rules_follow_the_advisor_signals() -> None:
    values = scenario_values("object-storage")
    values["autoscaling"] = {"engine": "hpa"}
    objects = objects_of(render(values))
    config = adapter_config(objects)
    assert config["rules"] == []
    assert served_series(config["externalRules"]) == {
        "swapline_advisor_desired_worker_replicas",
        "swapline_advisor_desired_triton_replicas",
    }


def test_the_adapter_rules_may_live_in_the_adapters_namespace_or_not_at_all() -> None:
    values = scenario_values("gpu-hpa")
    values["autoscaling"]["hpa"] = {"adapterRules": {"enabled": True, "namespace": "monitoring"}}
    (config_map,) = [
        item
        for item in of_kind(objects_of(render(values)), "ConfigMap")
        if item["metadata"]["name"] == ADAPTER_CONFIG_MAP
    ]
    assert config_map["metadata"]["namespace"] == "monitoring"
    values["autoscaling"]["hpa"] = {"adapterRules": {"enabled": False, "namespace": ""}}
    names = {item["metadata"]["name"] for item in of_kind(objects_of(render(values)), "ConfigMap")}
    assert ADAPTER_CONFIG_MAP not in names


def test_keda_needs_no_adapter_rules() -> None:
    names = {item["metadata"]["name"] for item in of_kind(scenario_objects("gpu-keda"), "ConfigMap")}
    assert ADAPTER_CONFIG_MAP not in names


def test_the_worker_signal_reads_the_series_the_gateway_exports() -> None:
    (exported,) = CHUNKS_OPEN.describe()
    assert exported.name == "swapline_gateway_chunks_open"
    scaled = [
        item
        for item in of_kind(scenario_objects("gpu-keda"), "ScaledObject")
        if item["spec"]["scaleTargetRef"]["name"] == component_name("worker")
    ]
    (query,) = [t["metadata"]["query"] for t in scaled[0]["spec"]["triggers"] if t["type"] == "prometheus"]
    # Collapsed across gateway replicas per state, then summed over the states.
    assert query == f'sum(max by (state) ({exported.name}{{namespace="{NAMESPACE}"}}))'


def worker_autoscaling(per_replica: int, **settings: int) -> dict[str, Any]:
    return {
        "monitoring": {"serviceMonitor": {"enabled": True}},
        "worker": {"settings": settings, "autoscaling": {"enabled": True, "openChunksPerReplica": per_replica}},
    }


def test_open_chunks_per_worker_may_not_exceed_the_workers_concurrency() -> None:
    (concurrency,) = [field.default for field in dataclasses.fields(WorkerSettings) if field.name == "concurrency"]
    assert isinstance(concurrency, int)
    message = render_error(worker_autoscaling(concurrency + 1))
    assert f"openChunksPerReplica {concurrency + 1} is above the workers' concurrency {concurrency}" in message
    assert of_kind(objects_of(render(worker_autoscaling(concurrency))), "ScaledObject")
    assert of_kind(objects_of(render(worker_autoscaling(concurrency + 1, concurrency=concurrency + 1))), "ScaledObject")


def alert_names(objects: list[Manifest]) -> set[str]:
    return {
        rule["alert"]
        for item in of_kind(objects, "PrometheusRule")
        for group in item["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_the_exporter_down_alert_goes_with_the_exporter() -> None:
    rules_on = {"monitoring": {"prometheusRule": {"enabled": True}}}
    assert "SwaplineExporterDown" in alert_names(objects_of(render(rules_on)))
    without_exporter = alert_names(objects_of(render({**rules_on, "exporter": {"enabled": False}})))
    assert "SwaplineExporterDown" not in without_exporter
    # The other alerts stay.
    assert {"SwaplineGpuSaturated", "SwaplineTritonQueueGrowing"} <= without_exporter

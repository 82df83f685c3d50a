"""The chart renders with Helm's own code, lints clean, and every object passes Kubernetes 1.30's schemas."""

from __future__ import annotations

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.deploy.chart_render import (
    CHART_DIR,
    KUBERNETES_VERSION,
    REPO_ROOT,
    REQUIRED_SCENARIOS,
    objects_of,
    render,
    scenario_names,
    scenario_notes,
    scenario_objects,
    scenario_values,
)

# Kinds whose schemas come from CRDs (KEDA, Prometheus Operator, cert-manager), absent from the Kubernetes OpenAPI;
# tests/deploy/test_chart_crds.py checks them by hand.
CRD_KINDS = frozenset({"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule", "Certificate"})
SCENARIOS = ["default", *scenario_names()]


def test_the_acceptance_scenarios_exist() -> None:
    assert set(REQUIRED_SCENARIOS) <= set(scenario_names())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_validates_against_kubernetes_strictly(scenario: str) -> None:
    problems = []
    validated = 0
    for item in scenario_objects(scenario):
        if item["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
            validated += 1
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(part) for part in error.path)
            problems.append(f"{item['kind']}/{item['metadata']['name']} at {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(error.message)
    assert problems == []
    assert validated >= 20


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_reports_no_errors(scenario: str) -> None:
    values = None if scenario == "default" else scenario_values(scenario)
    # strict: warnings count as errors too.
    report = helm_python.lint(
        CHART_DIR, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}.0", namespace="media"
    )
    findings = [message for message in report["messages"] if message["severity"] >= 2]
    assert findings == []
    assert report["errors"] == []
    assert report["total_charts_linted"] == 1


def test_lint_does_report_errors_for_values_the_schema_rejects() -> None:
    report = helm_python.lint(CHART_DIR, {"worker": {"replicaCount": -1}}, kube_version="v1.30.0")
    assert any(message["severity"] == 3 for message in report["messages"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_object_names_are_unique_per_kind(scenario: str) -> None:
    keys = [(item["kind"], item["metadata"]["name"]) for item in scenario_objects(scenario)]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_namespaced_objects_land_in_the_release_namespace(scenario: str) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for item in scenario_objects(scenario):
        if item["kind"] not in cluster_scoped:
            assert item["metadata"]["namespace"] == "media", f"{item['kind']}/{item['metadata']['name']}"


def test_helm_follows_the_symlinks_to_the_monitoring_files() -> None:
    files = {entry["name"]: entry["data"] for entry in helm_python.Chart.load(CHART_DIR).files}
    for name in ("swapline-alerts.yaml", "swapline-dashboard.json"):
        link = CHART_DIR / "files" / name
        assert link.is_symlink()
        assert link.resolve() == REPO_ROOT / "deploy" / "monitoring" / name
        assert files[f"files/{name}"] == link.resolve().read_text()


def test_the_prometheus_rule_carries_the_rules_file_groups() -> None:
    rendered = render({"monitoring": {"prometheusRule": {"enabled": True}}})
    rule = yaml.safe_load(rendered["swapline/templates/prometheusrule.yaml"])
    source = yaml.safe_load((REPO_ROOT / "deploy" / "monitoring" / "swapline-alerts.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]


def test_the_dashboard_config_map_carries_the_dashboard_file() -> None:
    rendered = render({"monitoring": {"grafanaDashboard": {"enabled": True}}})
    config_map = yaml.safe_load(rendered["swapline/templates/grafana-dashboard-configmap.yaml"])
    source = (REPO_ROOT / "deploy" / "monitoring" / "swapline-dashboard.json").read_text()
    assert config_map["data"]["swapline-dashboard.json"] == source.rstrip("\n")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_notes_say_how_to_reach_the_gateway_and_what_autoscales() -> None:
    notes = scenario_notes("gpu-keda")
    assert "dns:///demo-swapline-gateway.media.svc.cluster.local:50051" in notes
    assert "kubectl -n media port-forward deploy/demo-swapline-gateway 50051:50051" in notes
    assert "Autoscaling: keda for worker decoder detector encoder triton" in notes


def test_the_readme_values_example_renders_and_validates() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Install on a GPU cluster") :]
    example = section[section.index("# my-values.yaml") :]
    example = example[: example.index("```")]
    objects = objects_of(render(yaml.safe_load(example)))
    for item in objects:
        if item["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
    assert {"ScaledObject", "ServiceMonitor", "PrometheusRule"} <= {item["kind"] for item in objects}

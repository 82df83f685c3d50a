"""The Grafana dashboard's and the rules file's PromQL parse and use only metric names that exist.

Names that exist: the swapline_* names defined in services/ (prometheus_client metrics and the exporter's
metric families; a renamed metric drops its old name from the code and so fails this test), Triton's own
metrics, and the recording rules of the rules file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_FILE = REPO_ROOT / "deploy" / "monitoring" / "swapline-dashboard.json"
RULES_FILE = REPO_ROOT / "deploy" / "monitoring" / "swapline-alerts.yaml"
SERVICES_DIR = REPO_ROOT / "services"

# Triton's Prometheus metrics (server docs, "Metrics"): inference counters and durations, per model.
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_inference_pending_request_count",
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_power_usage",
    }
)
PROMETHEUS_METRICS = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})

# The exporter's metrics as the telemetry contract names them (notes/telemetry_contract.md).
CONTRACT_METRICS = frozenset(
    {
        "swapline_gpu_nvml_up",
        "swapline_gpu_info",
        "swapline_gpu_utilization_percent",
        "swapline_gpu_memory_utilization_percent",
        "swapline_gpu_memory_used_bytes",
        "swapline_gpu_memory_total_bytes",
        "swapline_gpu_memory_reserved_bytes",
        "swapline_gpu_temperature_celsius",
        "swapline_gpu_power_watts",
        "swapline_gpu_power_limit_watts",
        "swapline_gpu_sm_clock_mhz",
        "swapline_gpu_memory_clock_mhz",
        "swapline_gpu_clock_event_active",
        "swapline_gpu_encoder_utilization_percent",
        "swapline_gpu_decoder_utilization_percent",
        "swapline_gpu_pcie_tx_bytes_per_second",
        "swapline_gpu_pcie_rx_bytes_per_second",
        "swapline_gpu_ecc_uncorrected_errors_total",
        "swapline_gpu_xid_errors_total",
        "swapline_gpu_process_memory_used_bytes",
        "swapline_gpu_process_sm_utilization_percent",
        "swapline_exporter_sweep_seconds",
        "swapline_exporter_sweeps_total",
        "swapline_exporter_nvml_errors_total",
    }
)
# What the dashboard must show (issue 3 and the brief): a panel goes missing, this fails.
REQUIRED_ON_DASHBOARD = frozenset(
    {
        "swapline_gpu_utilization_percent",
        "swapline_gpu_memory_used_bytes",
        "swapline_gpu_memory_total_bytes",
        "swapline_gpu_temperature_celsius",
        "swapline_gpu_power_watts",
        "swapline_gpu_sm_clock_mhz",
        "swapline_gpu_memory_clock_mhz",
        "swapline_gpu_clock_event_active",
        "swapline_gpu_encoder_utilization_percent",
        "swapline_gpu_decoder_utilization_percent",
        "swapline_gpu_pcie_tx_bytes_per_second",
        "swapline_gpu_pcie_rx_bytes_per_second",
        "swapline_gpu_process_memory_used_bytes",
        "swapline_gpu_xid_errors_total",
        "swapline_gpu_ecc_uncorrected_errors_total",
        "swapline_gpu_nvml_up",
        "nv_inference_request_success",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "swapline_gateway_chunks_open",
        "swapline_rpc_seconds_bucket",
    }
)

# Grafana's variables stand in for PromQL text; these values make every expression plain PromQL.
GRAFANA_SUBSTITUTES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"inf", "nan", "Inf", "NaN", "atan2"}
)
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.*),)?\s*\w+\s*\)\s*$")
_METRIC_LITERAL = re.compile(r"""["'](swapline_[a-z0-9_]+)["']""")
_EXPOSED_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


def metric_names(expression: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables allowed), without a parser."""
    text = _STRING.sub('""', expression)
    text = _GRAFANA_VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _LABEL_LISTS.sub("", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS}


def plain_promql(expression: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTES.items():
        expression = expression.replace(variable, value)
    return _GRAFANA_VARIABLE.sub(".*", expression)


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _data_panels() -> list[dict[str, Any]]:
    return [panel for panel in _panels(_dashboard()["panels"]) if panel["type"] != "row"]


def _panel_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _data_panels()
        for target in panel["targets"]
    ]


def _dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and the selector of every query variable."""
    found = _panel_expressions()
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["query"]["query"])
        assert match is not None, f"variable {variable['name']} is not a label_values() query"
        if match["selector"]:
            found.append((f"variable {variable['name']}", match["selector"]))
    return found


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _code_metric_names() -> set[str]:
    """swapline_* names defined in services/, with the suffixes Prometheus exposes them under."""
    defined = {
        name
        for path in SERVICES_DIR.rglob("*.py")
        for name in _METRIC_LITERAL.findall(path.read_text(encoding="utf-8"))
    }
    return {name + suffix for name in defined for suffix in _EXPOSED_SUFFIXES}


def _known_metric_names() -> set[str]:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    return _code_metric_names() | TRITON_METRICS | PROMETHEUS_METRICS | recorded


def test_metric_names_finds_selected_metrics_and_ignores_functions_labels_and_variables() -> None:
    expression = (
        'histogram_quantile(0.95, sum by (le, method) (rate(swapline_rpc_seconds_bucket{job=~"$job"}'
        "[$__rate_interval]))) / on (method) group_left (node) max without (gpu) (up offset 5m) > 1e3"
        ' and ignoring (x) swapline:gpu_memory_used:ratio{reason="sum(by)"} unless nothing_here[5m:1m]'
    )

    assert metric_names(expression) == {
        "swapline_rpc_seconds_bucket",
        "up",
        "swapline:gpu_memory_used:ratio",
        "nothing_here",
    }


def test_dashboard_is_a_grafana_dashboard_with_datasource_node_and_gpu_variables() -> None:
    dashboard = _dashboard()
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}

    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["node"]["type"] == "query"
    assert variables["gpu"]["type"] == "query"
    assert "$node" in variables["gpu"]["query"]["query"]


def test_every_panel_queries_the_prometheus_variable_and_fits_the_grid() -> None:
    panels = _data_panels()
    ids = [panel["id"] for panel in _panels(_dashboard()["panels"])]

    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert all(target["datasource"]["uid"] == "${DS_PROMETHEUS}" for target in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_panel_filters_gpu_series_by_the_node_variable() -> None:
    for where, expression in _panel_expressions():
        if any(name.startswith("swapline_gpu_") for name in metric_names(expression)):
            assert '$node"' in expression, f"{where} ignores the node variable: {expression}"


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    """promtool checks each expression as a recording rule: a syntax error names the panel."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "no promtool on PATH: install Debian's prometheus package (`make install`)"
    expressions = _dashboard_expressions()
    rules = [
        {"record": f"dashboard:expression_{number}", "expr": plain_promql(expression)}
        for number, (_, expression) in enumerate(expressions)
    ]
    rules_file = tmp_path / "dashboard-expressions.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")

    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)

    where = "\n".join(f"dashboard:expression_{number} = {place}" for number, (place, _) in enumerate(expressions))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{where}"


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_uses_only_metric_names_that_exist(source: str) -> None:
    expressions = (
        _dashboard_expressions()
        if source == "dashboard"
        else [(rule.get("alert") or rule["record"], str(rule["expr"])) for rule in _rules()]
    )
    known = _known_metric_names()

    unknown = {f"{where}: {name}" for where, expression in expressions for name in metric_names(expression) - known}

    assert expressions
    assert unknown == set(), f"metric names defined nowhere: {sorted(unknown)}"


def test_dashboard_shows_every_required_metric() -> None:
    shown = {name for _, expression in _dashboard_expressions() for name in metric_names(expression)}

    assert REQUIRED_ON_DASHBOARD - shown == set()


def test_the_exporter_defines_every_metric_of_the_contract() -> None:
    assert CONTRACT_METRICS - _code_metric_names() == set()

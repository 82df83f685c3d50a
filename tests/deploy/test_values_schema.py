"""values.schema.json and the templates' guards reject bad values before anything reaches a cluster."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python
import pytest

from tests.deploy.chart_render import CHART_DIR, render


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


def test_the_default_values_pass_the_schema() -> None:
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(chart.values)


def test_a_wrong_type_is_rejected() -> None:
    message = render_error({"gateway": {"ports": {"grpc": "fifty"}}})
    assert "/gateway/ports/grpc" in message
    assert "want integer" in message


def test_an_unknown_key_is_rejected() -> None:
    message = render_error({"worker": {"replicas": 3}})
    assert "/worker" in message
    assert "additional properties 'replicas' not allowed" in message


def test_an_unknown_top_level_key_is_rejected() -> None:
    assert "additional properties 'workers' not allowed" in render_error({"workers": {"replicaCount": 3}})


def test_a_negative_replica_count_is_rejected() -> None:
    message = render_error({"decoder": {"replicaCount": -1}})
    assert "/decoder/replicaCount" in message
    assert "minimum: got -1, want 0" in message


def test_zero_replicas_are_allowed() -> None:
    rendered = render({"decoder": {"replicaCount": 0}})
    assert "replicas: 0" in rendered["swapline/templates/decoder-deployment.yaml"]


def test_gpus_are_requested_only_through_gpu_blocks() -> None:
    message = render_error({"worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}}})
    assert "additional properties 'nvidia.com/gpu' not allowed" in message


def test_a_typo_in_a_security_context_is_rejected() -> None:
    message = render_error({"encoder": {"securityContext": {"runAsNonroot": True}}})
    assert "/encoder/securityContext" in message


def test_sqlite_keeps_the_gateway_at_one_replica() -> None:
    message = render_error({"gateway": {"replicaCount": 2}})
    assert "/gateway/replicaCount" in message
    assert "maximum: got 2, want 1" in message


def test_sqlite_refuses_gateway_autoscaling() -> None:
    assert "/gateway/autoscaling/enabled" in render_error({"gateway": {"autoscaling": {"enabled": True}}})


def test_postgresql_allows_several_gateways() -> None:
    rendered = render(
        {"jobStore": {"type": "postgresql", "postgresql": {"existingSecret": "db"}}, "gateway": {"replicaCount": 3}}
    )
    assert "replicas: 3" in rendered["swapline/templates/gateway-deployment.yaml"]


def test_postgresql_needs_a_url_or_a_secret() -> None:
    assert "/jobStore/postgresql" in render_error({"jobStore": {"type": "postgresql"}})


def test_settings_names_are_field_names() -> None:
    message = render_error({"worker": {"settings": {"Batch-Size": 4}}})
    assert "'Batch-Size' does not match pattern" in message


def test_settings_may_not_override_what_the_chart_sets() -> None:
    message = render_error({"gateway": {"settings": {"port": 1234}}})
    assert "gateway.settings.port" in message
    assert "SWAPLINE_GATEWAY_PORT" in message


def test_service_and_pod_monitors_are_not_both_enabled() -> None:
    both = {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}
    message = render_error({"monitoring": both})
    assert "enable one" in message


def test_the_queue_ratio_signal_needs_keda() -> None:
    message = render_error({"autoscaling": {"engine": "hpa"}, "triton": {"autoscaling": {"enabled": True}}})
    assert "queueRatio needs autoscaling.engine keda" in message


def test_the_schema_is_closed_everywhere_it_describes_an_object() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}/{index}")

    walk(schema, "")
    # The allOf conditions only narrow properties already closed above.
    assert [path for path in open_objects if not path.startswith("/allOf")] == []


KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_.\-/\"]+):(\s|$)")


def undocumented_keys(text: str) -> list[str]:
    """Keys with no comment right above them; keys inside a value documented with `# --` belong to it."""
    lines = text.splitlines()
    stack: list[tuple[int, bool]] = []
    missing = []
    for number, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match or line.lstrip().startswith(("#", "-")):
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(documents_value for _, documents_value in stack):
            continue
        above = lines[number - 1].strip() if number else ""
        if not above.startswith("#"):
            missing.append(f"line {number + 1}: {line.strip()}")
            stack.append((indent, False))
            continue
        first = number - 1
        while first > 0 and lines[first - 1].strip().startswith("#"):
            first -= 1
        stack.append((indent, lines[first].strip().startswith("# --")))
    return missing


def test_every_values_key_is_commented() -> None:
    assert undocumented_keys((CHART_DIR / "values.yaml").read_text()) == []


def test_the_comment_check_finds_an_undocumented_key() -> None:
    text = "# group\ngroup:\n  # -- documented\n  a: 1\n  b: 2\n# -- value\nvalue:\n  inner: 1\n"
    assert undocumented_keys(text) == ["line 5: b: 2"]


def nested(path: str, leaf: Any) -> dict[str, Any]:
    """{"a": {"b": leaf}} for "a.b"."""
    node: Any = leaf
    for key in reversed(path.split(".")):
        node = {key: node}
    result: dict[str, Any] = node
    return result


@pytest.mark.parametrize(
    "section",
    [
        "security",
        "tls",
        "tls.componentSecrets",
        "tls.certManager",
        "tls.certManager.issuerRef",
        "auth",
        "auth.tenantTokens",
        "auth.internalToken",
        "networkPolicy",
        "networkPolicy.postgresql",
        "networkPolicy.prometheus",
        "networkPolicy.objectStorage",
    ],
)
def test_an_unknown_key_under_a_security_section_is_rejected(section: str) -> None:
    message = render_error(nested(section, {"bogus": True}))
    assert f"at '/{section.replace('.', '/')}'" in message
    assert "additional properties 'bogus' not allowed" in message


def test_an_unknown_key_in_a_tenant_token_is_rejected() -> None:
    token = {"tenant": "acme", "token": "t" * 32, "role": "admin"}
    message = render_error({"auth": {"tenantTokens": {"tokens": [token]}}})
    assert "/auth/tenantTokens/tokens/0" in message
    assert "additional properties 'role' not allowed" in message


def test_an_unknown_key_in_a_network_policy_peer_is_rejected() -> None:
    message = render_error({"networkPolicy": {"clientsFrom": [{"podSelectr": {}}]}})
    assert "/networkPolicy/clientsFrom/0" in message


def test_plaintext_is_reachable_only_through_open_mode() -> None:
    message = render_error({"security": {"transportSecurity": "plaintext"}})
    assert "/security/transportSecurity" in message


@pytest.mark.parametrize(
    ("token", "tenant"),
    [("short", "acme"), ("t" * 20 + " spaced", "acme"), ("t" * 32, "two words"), ("t" * 32, "")],
)
def test_tenant_tokens_are_long_printable_and_name_one_tenant(token: str, tenant: str) -> None:
    message = render_error({"auth": {"tenantTokens": {"tokens": [{"tenant": tenant, "token": token}]}}})
    assert "/auth/tenantTokens/tokens/0/" in message


def test_cert_manager_needs_an_issuer() -> None:
    message = render_error({"tls": {"certManager": {"enabled": True}}})
    assert "/tls/certManager/issuerRef/name" in message

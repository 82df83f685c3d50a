"""The chart against the code: each service's settings class, command and ports (docs: deploy contract)."""

from __future__ import annotations

import importlib
import json
import re
import typing
from typing import Any

import pytest

from services.common.settings_loader import all_env_names, load_settings, required_env_names
from services.gateway.retention_policy import RetentionLimits
from services.gateway.settings import GatewaySettings
from services.gateway.tenant_chunk_limits import TenantChunkLimits
from tests.deploy.chart_render import (
    CHART_DIR,
    DOCKERFILE,
    PYTHON_SERVICES,
    containers_of,
    env_values,
    objects_of,
    render,
    scenario_names,
    scenario_objects,
    workload_of,
)

SCENARIOS = ["default", *scenario_names()]
SETTINGS_CLASSES = {
    "gateway": "services.gateway.settings.GatewaySettings",
    "worker": "services.worker.settings.WorkerSettings",
    "decoder": "services.decoder.settings.DecoderSettings",
    "detector": "services.detector.settings.DetectorSettings",
    "encoder": "services.encoder.settings.EncoderSettings",
    "advisor": "services.advisor.settings.AdvisorSettings",
    "exporter": "services.exporter.settings.ExporterSettings",
}
# The deployment contract's cluster ports by container port name; the exporter serves /metrics on its one port.
CONTRACT_PORTS = {
    "gateway": {"grpc": 50051, "internal": 50052, "metrics": 9090},
    "decoder": {"grpc": 50061, "metrics": 9090},
    "detector": {"grpc": 50062, "metrics": 9090},
    "encoder": {"grpc": 50063, "metrics": 9090},
    "worker": {"grpc": 50064, "metrics": 9090},
    "advisor": {"grpc": 50071, "metrics": 9090},
    "exporter": {"metrics": 9400},
}
# The settings field each container port is configured by.
PORT_FIELDS = {"grpc": "PORT", "internal": "INTERNAL_PORT", "metrics": "METRICS_PORT"}
# Stand-ins for values Kubernetes fills in at run time.
RUNTIME_VALUES = {"fieldRef": "gpu-node-1", "secretKeyRef": "postgresql://swapline@db:5432/swapline"}


def settings_class(service: str) -> type:
    module_name, class_name = SETTINGS_CLASSES[service].rsplit(".", 1)
    cls: type = getattr(importlib.import_module(module_name), class_name)
    return cls


def prefix_of(service: str) -> str:
    return f"SWAPLINE_{service.upper()}_"


def rendered_services(scenario: str) -> list[str]:
    objects = scenario_objects(scenario)
    present = []
    for service in PYTHON_SERVICES:
        try:
            workload_of(objects, service)
        except AssertionError:
            continue
        present.append(service)
    return present


def service_container(scenario: str, service: str) -> dict[str, Any]:
    (container,) = containers_of(workload_of(scenario_objects(scenario), service))
    return container


def runtime_environment(container: dict[str, Any]) -> dict[str, str]:
    environment = {}
    for variable in container["env"]:
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        else:
            (source,) = variable["valueFrom"]
            environment[variable["name"]] = RUNTIME_VALUES[source]
    return environment


def image_entrypoint() -> list[str]:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    entrypoint: list[str] = json.loads(line.removeprefix("ENTRYPOINT").strip())
    return entrypoint


def test_every_service_of_the_contract_is_deployed_by_default() -> None:
    assert rendered_services("default") == list(PYTHON_SERVICES)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_required_setting_is_set(scenario: str) -> None:
    for service in rendered_services(scenario):
        names = {variable["name"] for variable in service_container(scenario, service)["env"]}
        missing = set(required_env_names(settings_class(service), prefix_of(service))) - names
        assert missing == set(), f"{service} lacks {sorted(missing)}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_prefixed_variable_is_a_settings_field(scenario: str) -> None:
    for service in rendered_services(scenario):
        prefix = prefix_of(service)
        known = set(all_env_names(settings_class(service), prefix))
        names = {variable["name"] for variable in service_container(scenario, service)["env"]}
        unknown = {name for name in names if name.startswith(prefix)} - known
        assert unknown == set(), f"{service} sets unknown {sorted(unknown)}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_settings_load_from_the_rendered_environment(scenario: str) -> None:
    for service in rendered_services(scenario):
        environment = runtime_environment(service_container(scenario, service))
        settings: Any = load_settings(settings_class(service), prefix_of(service), environment)
        assert settings.host == "0.0.0.0"


def test_the_settings_check_catches_a_missing_variable() -> None:
    environment = runtime_environment(service_container("default", "worker"))
    del environment["SWAPLINE_WORKER_TRITON_URL"]
    with pytest.raises(Exception, match="SWAPLINE_WORKER_TRITON_URL must be set"):
        load_settings(settings_class("worker"), prefix_of("worker"), environment)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_service_runs_python_m_its_module(scenario: str) -> None:
    entrypoint = image_entrypoint()
    assert entrypoint == ["python", "-m"]
    for service in rendered_services(scenario):
        container = service_container(scenario, service)
        command = container.get("command", entrypoint) + container.get("args", [])
        assert command == ["python", "-m", f"services.{service}"]
        assert importlib.util.find_spec(f"services.{service}.__main__") is not None


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ports_match_the_settings_and_the_contract(scenario: str) -> None:
    for service in rendered_services(scenario):
        container = service_container(scenario, service)
        environment = runtime_environment(container)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == CONTRACT_PORTS[service]
        prefix = prefix_of(service)
        if service == "exporter":
            assert int(environment[f"{prefix}PORT"]) == ports["metrics"]
            continue
        for name, port in ports.items():
            assert int(environment[f"{prefix}{PORT_FIELDS[name]}"]) == port, f"{service} {name}"


def test_settings_values_become_prefixed_variables() -> None:
    environment = env_values(service_container("gpu-keda", "worker"))
    assert environment["SWAPLINE_WORKER_CONCURRENCY"] == "2"
    assert environment["SWAPLINE_WORKER_BATCH_SIZE"] == "16"
    assert environment["SWAPLINE_WORKER_MAX_MESSAGE_BYTES"] == "268435456"


def test_retention_values_become_the_gateways_retention_policy() -> None:
    tenants = [{"tenant": "acme", "maxAgeSeconds": 86400, "maxBytes": 107374182400}]
    retention = {"maxAgeSeconds": 3600, "maxBytes": 10737418240, "interruptedSeconds": 600, "tenants": tenants}
    (container,) = containers_of(workload_of(objects_of(render({"gateway": {"retention": retention}})), "gateway"))
    settings = load_settings(GatewaySettings, prefix_of("gateway"), runtime_environment(container))
    policy = settings.retention_policy()
    assert policy.default == RetentionLimits(3600.0, 10737418240)
    assert policy.tenants == {"acme": RetentionLimits(86400.0, 107374182400)}
    assert (policy.interrupted_seconds, policy.sweep_interval_seconds) == (600.0, 300.0)


def test_whole_numbers_are_rendered_without_an_exponent() -> None:
    for scenario in SCENARIOS:
        for service in rendered_services(scenario):
            for value in env_values(service_container(scenario, service)).values():
                assert not re.fullmatch(r"[0-9.]+e[+-][0-9]+", value), value


# Values keys the chart turns into a settings field of a Literal type: (service, values key, settings field).
CHOICE_VALUES = [("decoder", "backend", "backend"), ("encoder", "backend", "backend"), ("worker", "device", "device")]


@pytest.mark.parametrize(("service", "key", "field"), CHOICE_VALUES)
def test_the_schema_offers_exactly_the_settings_choices(service: str, key: str, field: str) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    offered = schema["properties"][service]["properties"][key]["enum"]
    hints = typing.get_type_hints(settings_class(service))
    assert field in hints, f"{SETTINGS_CLASSES[service]} has no field {field} for {prefix_of(service)}{field.upper()}"
    assert offered == list(typing.get_args(hints[field]))


def test_scheduling_values_become_the_gateways_tenant_chunk_limits() -> None:
    scheduling = {"maxLeasedChunks": 8, "tenants": [{"tenant": "acme", "maxLeasedChunks": 32}]}
    (container,) = containers_of(workload_of(objects_of(render({"gateway": {"scheduling": scheduling}})), "gateway"))
    settings = load_settings(GatewaySettings, prefix_of("gateway"), runtime_environment(container))
    assert settings.leased_chunk_limits() == TenantChunkLimits(8, {"acme": 32})

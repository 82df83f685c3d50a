"""Under TLS the kubelet cannot probe the swapline services and Prometheus must scrape them over HTTPS: the
chart's exec probes and monitors are run here against real servers started from the rendered settings and
certificates, and must pass only when the certificate holds the name they check."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import grpc
import pytest

from services.common import health_probe
from services.common.grpc_server import ServiceBinding, start_metrics, start_server
from services.common.server_settings import ServerSettings
from services.common.settings_loader import load_settings
from tests.deploy.chart_render import Manifest, component_name, objects_of, of_kind, render, scenario_objects
from tests.deploy.test_chart_security import (
    SECURE_SCENARIOS,
    mounted_secret,
    pod_and_container,
    present_services,
    secret_data,
    security_env,
)
from tests.deploy.test_chart_settings import image_entrypoint, prefix_of, runtime_environment

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# The image's interpreter (its ENTRYPOINT is ["python", "-m"]) running the probe module.
PROBE_COMMAND = [*image_entrypoint(), "services.common.health_probe"]
SERVICE_COUNT = 6
# The monitors of each kind in a scenario that renders them, with the chart's generated certificates.
MONITOR_SCENARIOS = [
    ("monitoring-on", "ServiceMonitor", "endpoints"),
    ("object-storage", "PodMonitor", "podMetricsEndpoints"),
]


def probe_arguments(container: Manifest) -> list[str]:
    """The health probe's arguments: every probe of the container runs the same exec command."""
    commands = [container[probe]["exec"]["command"] for probe in PROBES]
    assert all(set(container[probe]) & {"exec", "grpc", "tcpSocket", "httpGet"} == {"exec"} for probe in PROBES)
    assert commands.count(commands[0]) == len(PROBES)
    assert commands[0][: len(PROBE_COMMAND)] == PROBE_COMMAND
    return list(commands[0][len(PROBE_COMMAND) :])


def option_value(arguments: list[str], option: str) -> str:
    return arguments[arguments.index(option) + 1]


def with_option(arguments: list[str], option: str, value: str) -> list[str]:
    changed = list(arguments)
    changed[changed.index(option) + 1] = value
    return changed


def pod_environment(objects: list[Manifest], service: str, root: Path) -> dict[str, str]:
    """The container's env, with each mounted Secret file written under `root` and its setting pointing there."""
    environment = runtime_environment(pod_and_container(objects, service)[1])
    for name, path in environment.items():
        if name.endswith("_FILE"):
            secret, key = mounted_secret(objects, service, path)
            local = root / service / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(secret_data(objects, secret)[key])
            environment[name] = str(local)
    return environment


def register_nothing(servicer: object, server: grpc.aio.Server) -> None:
    """A stand-in service: the listener, its TLS and its health service are what a probe meets."""


def stand_in_bindings(service: str) -> list[ServiceBinding]:
    """The listeners the real service has: the gateway a public and an internal port, the others one internal."""
    internal = ServiceBinding(None, register_nothing, "swapline.test.v1.Internal")
    if service == "gateway":
        return [ServiceBinding(None, register_nothing, "swapline.test.v1.Public", audience="public"), internal]
    return [internal]


async def probe_exit_codes(
    service: str, environment: dict[str, str], argument_lists: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Starts the service's listeners from its settings on free loopback ports, then runs the probe's main()
    with the container's env (the bound ports in place of the chart's) once per argument list."""
    prefix = prefix_of(service)
    listen = {**environment, f"{prefix}HOST": "127.0.0.1", f"{prefix}PORT": "0", f"{prefix}INTERNAL_PORT": "0"}
    running = await start_server(load_settings(ServerSettings, prefix, listen), stand_in_bindings(service))
    try:
        bound = {f"{prefix}PORT": str(running.port), f"{prefix}INTERNAL_PORT": str(running.internal_port)}
        for name, value in {**environment, **bound}.items():
            monkeypatch.setenv(name, value)
        return [await asyncio.to_thread(health_probe.main, arguments) for arguments in argument_lists]
    finally:
        await running.stop(None)


@pytest.mark.parametrize("scenario", SECURE_SCENARIOS)
def test_tls_services_are_probed_by_the_health_probe_with_their_own_settings(scenario: str) -> None:
    objects = scenario_objects(scenario)
    certificates = {item["metadata"]["name"]: item["spec"] for item in of_kind(objects, "Certificate")}
    for service in present_services(objects):
        container = pod_and_container(objects, service)[1]
        arguments = probe_arguments(container)
        assert arguments[0] == prefix_of(service)
        assert float(option_value(arguments, "--timeout")) == container["livenessProbe"]["timeoutSeconds"]
        if certificates:
            assert option_value(arguments, "--server-name") in certificates[component_name(service)]["dnsNames"]


def test_open_mode_keeps_the_kubelets_grpc_probes() -> None:
    objects = scenario_objects("open-mode")
    for service in present_services(objects):
        container = pod_and_container(objects, service)[1]
        for probe in PROBES:
            assert container[probe]["grpc"] == {"port": container["ports"][0]["containerPort"]}, service
            assert "exec" not in container[probe]


@pytest.mark.parametrize("transport", ["tls", "mtls"])
def test_each_probe_passes_against_its_service_and_fails_for_another_certificate_name(
    transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = objects_of(render({"security": {"transportSecurity": transport}}))
    services = list(present_services(objects))
    assert len(services) == SERVICE_COUNT
    server_names = {
        service: option_value(probe_arguments(pod_and_container(objects, service)[1]), "--server-name")
        for service in services
    }

    async def probe_every_service() -> dict[str, list[int]]:
        results = {}
        for index, service in enumerate(services):
            assert security_env(objects, service)["TRANSPORT_SECURITY"] == transport
            arguments = probe_arguments(pod_and_container(objects, service)[1])
            neighbour = services[index - 1]
            misnamed = with_option(arguments, "--server-name", server_names[neighbour])
            environment = pod_environment(objects, service, tmp_path)
            results[service] = await probe_exit_codes(service, environment, [arguments, misnamed], monkeypatch)
        return results

    assert asyncio.run(probe_every_service()) == {service: [0, 1] for service in services}


def scrape_status(port: int, ca: bytes, server_name: str) -> str:
    """The status line of GET /metrics on 127.0.0.1:port over TLS, the certificate verified as `server_name`."""
    context = ssl.create_default_context(cadata=ca.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as connection,
    ):
        connection.sendall(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        return connection.makefile("rb").readline().decode().strip()


def scrape_endpoints(objects: list[Manifest], kind: str, key: str) -> dict[str, Manifest]:
    """Component -> the one endpoint its monitor scrapes."""
    endpoints = {}
    for monitor in of_kind(objects, kind):
        (endpoint,) = monitor["spec"][key]
        endpoints[monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]] = endpoint
    return endpoints


@pytest.mark.parametrize(("scenario", "kind", "key"), MONITOR_SCENARIOS)
def test_prometheus_scrapes_the_services_over_https_verified_by_their_ca_and_name(
    scenario: str, kind: str, key: str, tmp_path: Path
) -> None:
    objects = scenario_objects(scenario)
    endpoints = scrape_endpoints(objects, kind, key)
    services = list(present_services(objects))
    assert len(services) == SERVICE_COUNT
    for service in services:
        endpoint = endpoints[service]
        assert endpoint["scheme"] == "https"
        tls = endpoint["tlsConfig"]
        assert set(tls) == {"ca", "serverName"}
        mounted_ca = mounted_secret(objects, service, security_env(objects, service)["TLS_CA_FILE"])
        assert (tls["ca"]["secret"]["name"], tls["ca"]["secret"]["key"]) == mounted_ca
        ca = secret_data(objects, tls["ca"]["secret"]["name"])[tls["ca"]["secret"]["key"]]
        prefix = prefix_of(service)
        environment = pod_environment(objects, service, tmp_path)
        environment.update({f"{prefix}HOST": "127.0.0.1", f"{prefix}METRICS_PORT": "0"})
        server = start_metrics(load_settings(ServerSettings, prefix, environment))
        try:
            assert " 200 " in scrape_status(server.server_port, ca, tls["serverName"]), service
            with pytest.raises(ssl.SSLCertVerificationError):
                scrape_status(server.server_port, ca, "prometheus.invalid")
        finally:
            server.shutdown()
            server.server_close()
    for component in ("triton", "exporter"):
        assert endpoints[component]["scheme"] == "http"
        assert "tlsConfig" not in endpoints[component]


def test_monitors_trust_the_ca_of_the_secret_each_component_mounts() -> None:
    values = {
        "tls": {"existingSecret": "swapline-tls", "componentSecrets": {"gateway": "edge"}},
        "monitoring": {"serviceMonitor": {"enabled": True}},
    }
    objects = objects_of(render(values))
    endpoints = scrape_endpoints(objects, "ServiceMonitor", "endpoints")
    for service in present_services(objects):
        ca = endpoints[service]["tlsConfig"]["ca"]["secret"]
        assert ca == {"name": "edge" if service == "gateway" else "swapline-tls", "key": "ca.crt"}, service


def test_open_mode_monitors_scrape_plain_http() -> None:
    values = {"security": {"openMode": True}, "monitoring": {"podMonitor": {"enabled": True}}}
    endpoints = scrape_endpoints(objects_of(render(values)), "PodMonitor", "podMetricsEndpoints")
    assert set(endpoints) >= {"gateway", "worker", "decoder", "detector", "encoder", "advisor", "triton"}
    for component, endpoint in endpoints.items():
        assert endpoint["scheme"] == "http", component
        assert "tlsConfig" not in endpoint, component

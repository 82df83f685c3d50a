"""The chart is secure by default: TLS and tokens on every swapline gRPC service, no reflection, the chunk
queue on its own internal Service, and plaintext only when open mode is asked for."""

from __future__ import annotations

import base64
import posixpath
import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import helm_python
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.settings_loader import load_settings
from tests.deploy.chart_render import (
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
    scenario_notes,
    scenario_objects,
    scenario_setting,
    workload_of,
    workloads,
)
from tests.deploy.test_chart_settings import prefix_of, runtime_environment, settings_class

SCENARIOS = ["default", *scenario_names()]
SECURE_SCENARIOS = [name for name in SCENARIOS if not scenario_setting(name, "security.openMode", False)]
GRPC_SERVICES = ("gateway", "worker", "decoder", "detector", "encoder", "advisor")
TLS_FILES = {"TLS_CERT_FILE": "tls.crt", "TLS_KEY_FILE": "tls.key", "TLS_CA_FILE": "ca.crt"}
SECURITY_FIELDS = (
    "TRANSPORT_SECURITY",
    "AUTH_MODE",
    "REFLECTION",
    *TLS_FILES,
    "INTERNAL_TOKEN_FILE",
    "TENANT_TOKENS_FILE",
)
TARGET = re.compile(r"^dns:///(?P<host>[^:]+):(?P<port>\d+)$")
# Who calls whom over TLS, by the env variable naming the target.
TLS_CALLS = {
    ("worker", "SWAPLINE_WORKER_GATEWAY_TARGET"): "gateway",
    ("worker", "SWAPLINE_WORKER_DECODER_TARGET"): "decoder",
    ("worker", "SWAPLINE_WORKER_DETECTOR_TARGET"): "detector",
    ("worker", "SWAPLINE_WORKER_ENCODER_TARGET"): "encoder",
    ("gateway", "SWAPLINE_GATEWAY_DECODER_TARGET"): "decoder",
    ("gateway", "SWAPLINE_GATEWAY_DETECTOR_TARGET"): "detector",
    ("gateway", "SWAPLINE_GATEWAY_ENCODER_TARGET"): "encoder",
    ("gateway", "SWAPLINE_GATEWAY_ADVISOR_TARGET"): "advisor",
    ("advisor", "SWAPLINE_ADVISOR_GATEWAY_TARGET"): "gateway",
}


def present_services(objects: list[Manifest]) -> Iterator[str]:
    components = {
        item["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for item in workloads(objects)
    }
    yield from (service for service in GRPC_SERVICES if service in components)


def pod_and_container(objects: list[Manifest], component: str) -> tuple[Manifest, Manifest]:
    workload = workload_of(objects, component)
    (container,) = containers_of(workload)
    return workload["spec"]["template"]["spec"], container


def mounted_secret(objects: list[Manifest], component: str, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in the component's container."""
    pod, container = pod_and_container(objects, component)
    directory, file_name = posixpath.split(path)
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == directory]
    assert mount["readOnly"] is True
    volume = next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])
    (item,) = [item for item in volume["secret"]["items"] if item["path"] == file_name]
    return volume["secret"]["secretName"], item["key"]


def security_env(objects: list[Manifest], component: str) -> dict[str, str]:
    prefix = prefix_of(component)
    environment = env_values(pod_and_container(objects, component)[1])
    return {
        name.removeprefix(prefix): value
        for name, value in environment.items()
        if name.removeprefix(prefix) in SECURITY_FIELDS
    }


def secret_data(objects: list[Manifest], name: str) -> dict[str, bytes]:
    secret = named(objects, "Secret", name)
    data = {key: base64.b64decode(value) for key, value in secret.get("data", {}).items()}
    data.update({key: value.encode() for key, value in secret.get("stringData", {}).items()})
    return data


@pytest.mark.parametrize("scenario", SECURE_SCENARIOS)
def test_every_grpc_service_has_tls_a_token_and_no_reflection(scenario: str) -> None:
    objects = scenario_objects(scenario)
    transport = scenario_setting(scenario, "security.transportSecurity", "tls")
    services = list(present_services(objects))
    assert len(services) >= 5
    for service in services:
        env = security_env(objects, service)
        assert env["TRANSPORT_SECURITY"] == transport, service
        assert env["AUTH_MODE"] == "token", service
        assert env["REFLECTION"] == "false", service
        tls_secrets = set()
        for field_name, key in TLS_FILES.items():
            secret, mounted_key = mounted_secret(objects, service, env[field_name])
            assert mounted_key == key
            tls_secrets.add(secret)
        assert len(tls_secrets) == 1, service
        assert mounted_secret(objects, service, env["INTERNAL_TOKEN_FILE"])[0]


@pytest.mark.parametrize("scenario", SECURE_SCENARIOS)
def test_the_settings_classes_read_the_security_env(scenario: str) -> None:
    objects = scenario_objects(scenario)
    for service in present_services(objects):
        environment = runtime_environment(pod_and_container(objects, service)[1])
        settings: Any = load_settings(settings_class(service), prefix_of(service), environment)
        assert settings.transport_security in ("tls", "mtls")
        assert settings.auth_mode == "token"
        assert settings.reflection is False
        assert settings.tls_cert_file == Path("/etc/swapline/tls/tls.crt")
        assert settings.internal_token_file == Path("/etc/swapline/internal-token/token")


def test_neither_triton_nor_the_exporter_gets_swapline_credentials() -> None:
    objects = scenario_objects("default")
    for component in ("triton", "exporter"):
        workload = workload_of(objects, component)
        pod = workload["spec"]["template"]["spec"]
        (container,) = [item for item in containers_of(workload) if item["name"] == component]
        secret_volumes = {volume["name"] for volume in pod["volumes"] if "secret" in volume}
        # Triton's pod holds the residency sidecar's credentials; Triton itself mounts none of them.
        assert not [mount for mount in container["volumeMounts"] if mount["name"] in secret_volumes], component
        assert not [name for name in env_values(container) if name.endswith(("_FILE", "_TRANSPORT_SECURITY"))]
    assert not [volume for volume in pod_spec(objects, "exporter")["volumes"] if "secret" in volume]


def test_the_settings_values_cannot_downgrade_security() -> None:
    with pytest.raises(helm_python.HelmError, match="SWAPLINE_DECODER_TRANSPORT_SECURITY"):
        render({"decoder": {"settings": {"transport_security": "plaintext"}}})
    with pytest.raises(helm_python.HelmError, match="SWAPLINE_GATEWAY_AUTH_MODE"):
        render({"gateway": {"settings": {"auth_mode": "open"}}})


def test_reflection_is_turned_on_only_by_its_key() -> None:
    objects = objects_of(render({"security": {"reflection": True}}))
    for service in present_services(objects):
        assert security_env(objects, service)["REFLECTION"] == "true"
        assert security_env(objects, service)["TRANSPORT_SECURITY"] == "tls"


def test_open_mode_renders_plaintext_and_open_only_when_asked() -> None:
    objects = scenario_objects("open-mode")
    for service in present_services(objects):
        env = security_env(objects, service)
        assert env == {"TRANSPORT_SECURITY": "plaintext", "AUTH_MODE": "open", "REFLECTION": "true"}, service
        pod, container = pod_and_container(objects, service)
        assert not [volume for volume in pod["volumes"] if "secret" in volume]
        assert container["readinessProbe"]["grpc"]["port"] == container["ports"][0]["containerPort"]
    assert of_kind(objects, "Secret") == []
    assert of_kind(objects, "Certificate") == []
    assert "WARNING: security.openMode is true" in scenario_notes("open-mode")
    for scenario in SECURE_SCENARIOS:
        assert "WARNING" not in scenario_notes(scenario)
        secure = scenario_objects(scenario)
        assert {security_env(secure, service)["TRANSPORT_SECURITY"] for service in present_services(secure)} != {
            "plaintext"
        }


def test_the_gateway_serves_the_chunk_queue_on_its_own_port_and_service() -> None:
    objects = scenario_objects("default")
    public = named(objects, "Service", component_name("gateway"))
    internal = named(objects, "Service", component_name("gateway-internal"))
    assert [(port["name"], port["port"]) for port in public["spec"]["ports"]] == [("grpc", 50051)]
    assert [(port["name"], port["port"]) for port in internal["spec"]["ports"]] == [
        ("internal", 50052),
        ("metrics", 9090),
    ]
    assert internal["spec"]["selector"] == public["spec"]["selector"]
    gateway = pod_and_container(objects, "gateway")[1]
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports["internal"] == 50052 != ports["grpc"]
    assert env_values(gateway)["SWAPLINE_GATEWAY_INTERNAL_PORT"] == "50052"


def test_workers_lease_from_the_internal_service_and_the_advisor_reads_the_public_one() -> None:
    objects = scenario_objects("default")
    worker = env_values(pod_and_container(objects, "worker")[1])
    assert worker["SWAPLINE_WORKER_GATEWAY_TARGET"] == (
        "dns:///demo-swapline-gateway-internal.media.svc.cluster.local:50052"
    )
    advisor = env_values(pod_and_container(objects, "advisor")[1])
    assert advisor["SWAPLINE_ADVISOR_GATEWAY_TARGET"] == "dns:///demo-swapline-gateway.media.svc.cluster.local:50051"


def test_only_the_gateway_public_port_is_a_public_api() -> None:
    objects = scenario_objects("default")
    for service in of_kind(objects, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    tenant_readers = [
        service for service in present_services(objects) if "TENANT_TOKENS_FILE" in security_env(objects, service)
    ]
    assert tenant_readers == []
    with_tokens = objects_of(render({"auth": {"tenantTokens": {"existingSecret": "tenants"}}}))
    tenant_readers = [
        service
        for service in present_services(with_tokens)
        if "TENANT_TOKENS_FILE" in security_env(with_tokens, service)
    ]
    assert tenant_readers == ["gateway"]


# --- Certificates -------------------------------------------------------------------------------------


def tls_material(objects: list[Manifest], component: str) -> dict[str, bytes]:
    env = security_env(objects, component)
    secret, _ = mounted_secret(objects, component, env["TLS_CERT_FILE"])
    return secret_data(objects, secret)


def serves_health(server: dict[str, bytes], host: str, client: dict[str, bytes] | None) -> bool:
    """Whether a TLS handshake to a server with `server`'s pair succeeds for a client dialling `host`;
    with `client`, the server demands that client certificate (mtls)."""
    server_credentials = grpc.ssl_server_credentials(
        [(server["tls.key"], server["tls.crt"])],
        root_certificates=server["ca.crt"],
        require_client_auth=client is not None,
    )
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), grpc_server)
    port = grpc_server.add_secure_port("127.0.0.1:0", server_credentials)
    grpc_server.start()
    try:
        if client is None:
            channel_credentials = grpc.ssl_channel_credentials(root_certificates=server["ca.crt"])
        else:
            channel_credentials = grpc.ssl_channel_credentials(client["ca.crt"], client["tls.key"], client["tls.crt"])
        options = [("grpc.ssl_target_name_override", host)]
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials, options=options) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError:
                return False
            return True
    finally:
        grpc_server.stop(None)


def test_generated_certificates_carry_one_ca_and_stay_in_their_components() -> None:
    objects = scenario_objects("default")
    ca = secret_data(objects, "demo-swapline-tls-ca")
    for service in present_services(objects):
        env = security_env(objects, service)
        secret, _ = mounted_secret(objects, service, env["TLS_CERT_FILE"])
        assert secret == f"{component_name(service)}-tls"
        assert named(objects, "Secret", secret)["type"] == "kubernetes.io/tls"
        assert secret_data(objects, secret)["ca.crt"] == ca["tls.crt"]
    # No pod mounts the CA's key.
    for workload in workloads(objects):
        names = [
            volume["secret"]["secretName"]
            for volume in workload["spec"]["template"]["spec"]["volumes"]
            if "secret" in volume
        ]
        assert "demo-swapline-tls-ca" not in names


def test_generated_certificates_verify_each_call_by_its_service_name_with_mutual_tls() -> None:
    objects = scenario_objects("default")
    for (caller, variable), callee in TLS_CALLS.items():
        match = TARGET.match(env_values(pod_and_container(objects, caller)[1])[variable])
        assert match, variable
        assert serves_health(tls_material(objects, callee), match["host"], tls_material(objects, caller)), variable


def test_a_certificate_does_not_pass_for_another_service() -> None:
    objects = scenario_objects("default")
    assert not serves_health(
        tls_material(objects, "decoder"),
        "demo-swapline-encoder.media.svc.cluster.local",
        tls_material(objects, "worker"),
    )


def test_clients_verify_the_gateway_through_a_port_forward() -> None:
    objects = scenario_objects("default")
    assert serves_health(tls_material(objects, "gateway"), "localhost", None)
    assert not serves_health(tls_material(objects, "decoder"), "localhost", None)


def test_a_shared_secret_serves_every_component_and_a_component_secret_overrides_it() -> None:
    objects = objects_of(render({"tls": {"existingSecret": "swapline-tls", "componentSecrets": {"gateway": "edge"}}}))
    for service in present_services(objects):
        env = security_env(objects, service)
        expected = "edge" if service == "gateway" else "swapline-tls"
        assert mounted_secret(objects, service, env["TLS_CERT_FILE"])[0] == expected
    assert [item for item in of_kind(objects, "Secret") if item["type"] == "kubernetes.io/tls"] == []
    assert of_kind(objects, "Certificate") == []


def hosts_dialled(objects: list[Manifest]) -> dict[str, set[str]]:
    """Component -> the host names other containers dial it at."""
    service_owner = {
        item["metadata"]["name"]: item["spec"]["selector"]["app.kubernetes.io/component"]
        for item in of_kind(objects, "Service")
    }
    dialled: dict[str, set[str]] = {}
    for workload in workloads(objects):
        for value in env_values(containers_of(workload)[0]).values():
            match = TARGET.match(value)
            if match:
                owner = service_owner[match["host"].split(".")[0]]
                dialled.setdefault(owner, set()).add(match["host"])
    return dialled


def test_cert_manager_issues_one_certificate_per_component_for_every_name_it_is_dialled_at() -> None:
    objects = scenario_objects("cert-manager-mtls")
    dialled = hosts_dialled(objects)
    certificates = {item["metadata"]["name"]: item["spec"] for item in of_kind(objects, "Certificate")}
    # Triton's certificate is its residency sidecar's, which the workers dial at the Triton Service.
    assert set(certificates) == {component_name(service) for service in (*GRPC_SERVICES, "triton")}
    assert dialled["triton"] <= set(certificates[component_name("triton")]["dnsNames"])
    for service in present_services(objects):
        spec = certificates[component_name(service)]
        env = security_env(objects, service)
        assert mounted_secret(objects, service, env["TLS_CERT_FILE"])[0] == spec["secretName"]
        assert env["TRANSPORT_SECURITY"] == "mtls"
        assert dialled.get(service, set()) <= set(spec["dnsNames"]), service
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"] == {"name": "swapline-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert {"swapline.example.com", "localhost"} <= set(certificates[component_name("gateway")]["dnsNames"])
    assert of_kind(objects, "Secret") == []


# --- Tokens -------------------------------------------------------------------------------------------


def test_the_internal_token_is_generated_once_and_shared_by_the_grpc_services() -> None:
    objects = scenario_objects("default")
    token = secret_data(objects, "demo-swapline-internal-token")["token"]
    assert re.fullmatch(rb"[A-Za-z0-9]{48}", token)
    for service in present_services(objects):
        env = security_env(objects, service)
        assert mounted_secret(objects, service, env["INTERNAL_TOKEN_FILE"]) == ("demo-swapline-internal-token", "token")


def test_an_existing_internal_token_secret_replaces_the_generated_one() -> None:
    objects = scenario_objects("cert-manager-mtls")
    for service in present_services(objects):
        env = security_env(objects, service)
        assert mounted_secret(objects, service, env["INTERNAL_TOKEN_FILE"]) == ("swapline-internal-token", "token")
    assert [item for item in of_kind(objects, "Secret") if "internal-token" in item["metadata"]["name"]] == []


def test_tenant_tokens_from_values_become_token_tenant_lines_for_the_gateway() -> None:
    tokens = [{"tenant": "acme", "token": "a" * 32}, {"tenant": "globex", "token": "B-" + "b" * 30}]
    objects = objects_of(render({"auth": {"tenantTokens": {"tokens": tokens}}}))
    env = security_env(objects, "gateway")
    secret, key = mounted_secret(objects, "gateway", env["TENANT_TOKENS_FILE"])
    assert secret_data(objects, secret)[key].decode().splitlines() == [f"{'a' * 32} acme", f"B-{'b' * 30} globex"]
    assert (
        "swapline.io/tenant-tokens-checksum"
        in workload_of(objects, "gateway")["spec"]["template"]["metadata"]["annotations"]
    )


def test_changed_tenant_tokens_roll_the_gateway() -> None:
    def checksum(token: str) -> str:
        objects = objects_of(render({"auth": {"tenantTokens": {"tokens": [{"tenant": "acme", "token": token}]}}}))
        annotations = workload_of(objects, "gateway")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["swapline.io/tenant-tokens-checksum"])

    assert checksum("a" * 32) != checksum("c" * 32)


def test_an_existing_tenant_secret_is_mounted_as_it_is() -> None:
    objects = scenario_objects("cert-manager-mtls")
    env = security_env(objects, "gateway")
    assert mounted_secret(objects, "gateway", env["TENANT_TOKENS_FILE"]) == ("swapline-tenants", "tokens")
    assert "Tenant tokens: Secret swapline-tenants" in scenario_notes("cert-manager-mtls")


def test_without_tenant_tokens_no_tokens_are_invented_and_the_notes_say_so() -> None:
    objects = scenario_objects("default")
    assert "TENANT_TOKENS_FILE" not in security_env(objects, "gateway")
    assert [item for item in of_kind(objects, "Secret") if "tenant" in item["metadata"]["name"]] == []
    notes = " ".join(scenario_notes("default").split())
    assert (
        "The gateway starts (its probes pass, workers connect), but refuses every client call with UNAUTHENTICATED"
        in notes
    )


def test_the_notes_client_steps_reach_the_gateway_through_its_certificate() -> None:
    objects = scenario_objects("default")
    notes = scenario_notes("default")
    gateway = re.search(r"export SWAPLINE_GATEWAY=(?P<host>[^:\s]+):(?P<port>\d+)", notes)
    assert gateway and int(gateway["port"]) == pod_and_container(objects, "gateway")[1]["ports"][0]["containerPort"]
    ca = re.search(
        r"get secret (?P<secret>\S+) -o jsonpath='\{\.data\.ca\\\.crt\}' \| base64 -d > (?P<file>\S+)", notes
    )
    assert ca and f"export SWAPLINE_CA_FILE=$PWD/{ca['file']}" in notes
    assert ca["secret"] == mounted_secret(objects, "gateway", security_env(objects, "gateway")["TLS_CA_FILE"])[0]
    assert serves_health(tls_material(objects, "gateway"), gateway["host"], None)
    assert "SWAPLINE_CA_FILE" not in scenario_notes("open-mode")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"tls": {"existingSecret": "tls", "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
            "tls.existingSecret and tls.certManager.enabled",
        ),
        (
            {"auth": {"tenantTokens": {"existingSecret": "t", "tokens": [{"tenant": "a", "token": "x" * 16}]}}},
            "auth.tenantTokens.existingSecret and auth.tenantTokens.tokens",
        ),
        (
            {"auth": {"tenantTokens": {"tokens": [{"tenant": name, "token": "x" * 16} for name in ("a", "b")]}}},
            "tenants a and b share a token",
        ),
    ],
)
def test_contradicting_security_values_fail_the_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)

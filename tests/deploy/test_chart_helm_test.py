"""The `helm test` hook: a pod on the gateway's image that runs the smoke test module against the gateway's public
port with the credentials the gateway's own clients use, allowed through the NetworkPolicies to that port only."""

from __future__ import annotations

import importlib.util
import posixpath

import pytest

from services.cli.smoke_test import build_parser
from tests.deploy.chart_render import (
    NAMESPACE,
    Manifest,
    component_name,
    env_values,
    named,
    objects_of,
    of_kind,
    render,
    scenario_names,
    scenario_objects,
    scenario_setting,
    workload_of,
)
from tests.deploy.test_chart_network_policies import (
    KUBE_DNS,
    OUTSIDERS,
    chart_endpoints,
    connects,
    container_ports,
    namespace_endpoint,
)

SCENARIOS = ["default", *scenario_names()]
SECURE_SCENARIOS = [name for name in SCENARIOS if not scenario_setting(name, "security.openMode", False)]
POLICED_SCENARIOS = [name for name in SCENARIOS if scenario_setting(name, "networkPolicy.enabled", True)]
TEST_POD = component_name("helm-test")
DEFAULT_TIMEOUT_SECONDS = 600


def helm_test_pod(objects: list[Manifest]) -> Manifest:
    pod: Manifest = named(objects, "Pod", TEST_POD)
    return pod


def helm_test_container(objects: list[Manifest]) -> Manifest:
    (container,) = helm_test_pod(objects)["spec"]["containers"]
    result: Manifest = container
    return result


def gateway_container(objects: list[Manifest]) -> Manifest:
    (container,) = workload_of(objects, "gateway")["spec"]["template"]["spec"]["containers"]
    result: Manifest = container
    return result


def mounted_file(pod: Manifest, container: Manifest, path: str) -> tuple[Manifest, str]:
    """(the volume, the key or path inside it) of the file at `path` in the container."""
    (mount,) = [mount for mount in container["volumeMounts"] if path.startswith(mount["mountPath"] + "/")]
    (volume,) = [volume for volume in pod["spec"]["volumes"] if volume["name"] == mount["name"]]
    return volume, posixpath.relpath(path, mount["mountPath"])


def secret_key(volume: Manifest, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file `path` of a Secret volume."""
    (item,) = [item for item in volume["secret"]["items"] if item["path"] == path]
    return volume["secret"]["secretName"], item["key"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_test_pod_is_a_helm_test_hook_on_the_gateways_image(scenario: str) -> None:
    objects = scenario_objects(scenario)
    pod, container, gateway = helm_test_pod(objects), helm_test_container(objects), gateway_container(objects)
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert pod["spec"]["restartPolicy"] == "Never"
    timeout = scenario_setting(scenario, "helmTest.timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
    assert pod["spec"]["activeDeadlineSeconds"] == timeout
    assert (container["image"], container["imagePullPolicy"]) == (gateway["image"], gateway["imagePullPolicy"])
    # Every release pod is a pod of the default-deny policy, so the test pod needs its own.
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_command_is_the_smoke_test_module_and_its_arguments_parse(scenario: str) -> None:
    objects = scenario_objects(scenario)
    module, *arguments = helm_test_container(objects)["args"]
    # The image's ENTRYPOINT is ["python", "-m"]: the first argument is the module it runs.
    assert importlib.util.find_spec(module) is not None and module == "services.cli.smoke_test"
    parsed = build_parser().parse_args(arguments)
    gateway_port = container_ports(objects, "gateway")["grpc"]
    assert parsed.gateway == f"dns:///{component_name('gateway')}.{NAMESPACE}.svc.cluster.local:{gateway_port}"
    # The advisor, a client of the same JobService, dials the same target.
    if scenario_setting(scenario, "advisor.enabled", True):
        (advisor,) = workload_of(objects, "advisor")["spec"]["template"]["spec"]["containers"]
        assert env_values(advisor)["SWAPLINE_ADVISOR_GATEWAY_TARGET"] == parsed.gateway
    open_mode = scenario_setting(scenario, "security.openMode", False)
    assert (parsed.token_file is None, parsed.ca_file is None) == (open_mode, open_mode)


@pytest.mark.parametrize("scenario", SECURE_SCENARIOS)
def test_the_test_reads_the_internal_token_and_only_the_ca_of_the_gateways_certificate(scenario: str) -> None:
    objects = scenario_objects(scenario)
    pod, container = helm_test_pod(objects), helm_test_container(objects)
    parsed = build_parser().parse_args(container["args"][1:])
    token_volume, token_path = mounted_file(pod, container, str(parsed.token_file))
    ca_volume, ca_path = mounted_file(pod, container, str(parsed.ca_file))

    gateway = workload_of(objects, "gateway")["spec"]["template"]
    gateway_env = env_values(gateway_container(objects))
    gateway_token = mounted_file(
        gateway, gateway_container(objects), gateway_env["SWAPLINE_GATEWAY_INTERNAL_TOKEN_FILE"]
    )
    gateway_ca = mounted_file(gateway, gateway_container(objects), gateway_env["SWAPLINE_GATEWAY_TLS_CA_FILE"])
    assert secret_key(token_volume, token_path) == secret_key(*gateway_token)
    assert secret_key(ca_volume, ca_path) == secret_key(*gateway_ca)
    # The gateway's private key is not mounted into the test pod.
    assert [item["key"] for item in ca_volume["secret"]["items"]] == ["ca.crt"]
    for volume in (token_volume, ca_volume):
        assert volume["secret"]["defaultMode"] == 0o440


def test_in_open_mode_the_test_mounts_no_secret() -> None:
    pod = helm_test_pod(scenario_objects("open-mode"))
    assert [volume for volume in pod["spec"]["volumes"] if "secret" in volume] == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_test_pod_runs_restricted_with_a_writable_tmp_only(scenario: str) -> None:
    objects = scenario_objects(scenario)
    pod, container = helm_test_pod(objects), helm_test_container(objects)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "privileged" not in security and "hostNetwork" not in spec and "hostPID" not in spec
    (tmp,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
    assert "emptyDir" in next(volume for volume in spec["volumes"] if volume["name"] == tmp["name"])
    assert all(mount.get("readOnly") for mount in container["volumeMounts"] if mount is not tmp)
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("scenario", POLICED_SCENARIOS)
def test_the_test_pod_reaches_the_gateways_public_port_and_nothing_else(scenario: str) -> None:
    objects = scenario_objects(scenario)
    policies = of_kind(objects, "NetworkPolicy")
    tester = namespace_endpoint("helm-test", NAMESPACE, helm_test_pod(objects)["metadata"]["labels"], "10.244.8.1")
    reached = set()
    for name, endpoint in chart_endpoints(objects).items():
        for port_name, port in container_ports(objects, name).items():
            if connects(policies, tester, endpoint, port):
                reached.add((name, port_name))
            assert not connects(policies, endpoint, tester, port), name
    assert reached == {("gateway", "grpc")}
    assert connects(policies, tester, KUBE_DNS, 53, "UDP")
    for outsider in OUTSIDERS:
        assert not connects(policies, tester, outsider, 443)


def test_where_clients_are_narrowed_the_gateway_still_admits_the_test_pod() -> None:
    objects = scenario_objects("monitoring-on")
    assert scenario_setting("monitoring-on", "networkPolicy.clientsFrom", [])
    policies = of_kind(objects, "NetworkPolicy")
    gateway = chart_endpoints(objects)["gateway"]
    port = container_ports(objects, "gateway")["grpc"]
    stranger = namespace_endpoint("stranger", NAMESPACE, {"app": "stranger"}, "10.244.7.1")
    assert not connects(policies, stranger, gateway, port)
    tester = namespace_endpoint("helm-test", NAMESPACE, helm_test_pod(objects)["metadata"]["labels"], "10.244.8.1")
    assert connects(policies, tester, gateway, port)


def test_disabled_the_chart_renders_no_test_and_admits_no_test_pod() -> None:
    objects = objects_of(render({"helmTest": {"enabled": False}}))
    assert [item for item in objects if item["metadata"]["name"] == TEST_POD] == []
    gateway_policy = named(objects, "NetworkPolicy", component_name("gateway"))
    assert "helm-test" not in str(gateway_policy["spec"]["ingress"])

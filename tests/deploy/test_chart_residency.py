"""Triton's model residency sidecar: explicit model control, the workers' target, its policy and its values."""

from __future__ import annotations

import asyncio
import posixpath
from pathlib import Path
from typing import Any

import helm_python
import pytest

from services.common import health_probe
from services.common.grpc_server import start_server
from services.common.server_settings import ServerSettings
from services.common.settings_loader import all_env_names, load_settings
from services.residency.settings import ResidencySettings
from tests.deploy.chart_render import (
    GPU_RESOURCE,
    Manifest,
    component_name,
    containers_of,
    env_values,
    named,
    objects_of,
    of_kind,
    pod_spec,
    render,
    scenario_objects,
    workload_of,
)
from tests.deploy.test_chart_network_policies import allowed_flows
from tests.deploy.test_chart_security import secret_data
from tests.deploy.test_chart_settings import image_entrypoint, runtime_environment
from tests.deploy.test_chart_tls_health_and_metrics import probe_arguments, stand_in_bindings, with_option

PREFIX = "SWAPLINE_RESIDENCY_"
# The built-in set, written out here rather than read from the services.
BUILT_IN_MODELS = ["face_swapper", "face_swapper_fp32", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "mtcnn_cascade"]
TRITON_HOST = "demo-swapline-triton.media.svc.cluster.local"
DISABLED = {"triton": {"residency": {"enabled": False}}}


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


def container_named(objects: list[Manifest], component: str, name: str) -> Manifest:
    (container,) = [item for item in containers_of(workload_of(objects, component)) if item["name"] == name]
    return container


def sidecar(objects: list[Manifest]) -> Manifest:
    return container_named(objects, "triton", "residency")


def triton_args(objects: list[Manifest]) -> list[str]:
    args: list[str] = container_named(objects, "triton", "triton")["args"]
    return args


def sidecar_settings(container: Manifest) -> Any:
    return load_settings(ResidencySettings, PREFIX, runtime_environment(container))


def worker_env(objects: list[Manifest]) -> dict[str, str]:
    return env_values(container_named(objects, "worker", "worker"))


def service_ports(objects: list[Manifest]) -> dict[str, Manifest]:
    service = named(objects, "Service", component_name("triton"))
    return {port["name"]: port for port in service["spec"]["ports"]}


def test_the_sidecar_runs_the_residency_service_on_the_swapline_image() -> None:
    objects = scenario_objects("default")
    container = sidecar(objects)
    assert container["image"] == container_named(objects, "worker", "worker")["image"]
    assert image_entrypoint() + container["args"] == ["python", "-m", "services.residency"]
    assert GPU_RESOURCE not in container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"][3] == PREFIX, probe


def test_the_sidecar_settings_name_its_own_triton_and_its_repository() -> None:
    objects = scenario_objects("default")
    container = sidecar(objects)
    settings = sidecar_settings(container)
    triton_ports = {
        port["name"]: port["containerPort"] for port in container_named(objects, "triton", "triton")["ports"]
    }
    assert settings.triton_url == f"127.0.0.1:{triton_ports['grpc']}"
    assert f"--model-repository={settings.model_repository}" in triton_args(objects)
    assert settings.memory_budget_bytes == 0
    assert list(settings.pinned_models) == BUILT_IN_MODELS
    assert (settings.host, settings.port) == ("0.0.0.0", container["ports"][0]["containerPort"])
    known = set(all_env_names(ResidencySettings, PREFIX))
    assert {name for name in env_values(container) if name.startswith(PREFIX)} <= known
    (mount,) = [item for item in container["volumeMounts"] if item["mountPath"] == str(settings.model_repository)]
    assert mount["readOnly"] is True
    volumes = {volume["name"]: volume for volume in pod_spec(objects, "triton")["volumes"]}
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "demo-swapline-triton-models"


def test_triton_runs_in_explicit_mode_with_the_pinned_models_loaded_at_start() -> None:
    args = triton_args(scenario_objects("default"))
    assert "--model-control-mode=explicit" in args
    assert [arg.removeprefix("--load-model=") for arg in args if arg.startswith("--load-model=")] == BUILT_IN_MODELS


def test_pinned_models_and_extra_args_reach_triton_and_the_sidecar() -> None:
    pinned = ["face_swapper", "inswapper_128"]
    objects = objects_of(render({"triton": {"extraArgs": ["--log-verbose=1"], "residency": {"pinnedModels": pinned}}}))
    args = triton_args(objects)
    assert args[-4:] == [
        "--model-control-mode=explicit",
        "--load-model=face_swapper",
        "--load-model=inswapper_128",
        "--log-verbose=1",
    ]
    assert list(sidecar_settings(sidecar(objects)).pinned_models) == pinned


def test_the_triton_service_exposes_the_residency_port_and_workers_dial_it() -> None:
    objects = scenario_objects("default")
    port = service_ports(objects)["residency"]
    assert (port["targetPort"], port["appProtocol"]) == ("residency", "grpc")
    assert port["port"] == sidecar(objects)["ports"][0]["containerPort"]
    assert worker_env(objects)["SWAPLINE_WORKER_RESIDENCY_TARGET"] == f"dns:///{TRITON_HOST}:{port['port']}"


def test_only_workers_reach_the_residency_port() -> None:
    flows = allowed_flows(scenario_objects("monitoring-on"))
    assert {source for source, target, port in flows if (target, port) == ("triton", "residency")} == {"worker"}


def test_the_sidecar_presents_a_certificate_for_the_name_workers_dial() -> None:
    objects = scenario_objects("cert-manager-mtls")
    certificate = named(objects, "Certificate", component_name("triton"))["spec"]
    container = sidecar(objects)
    settings = sidecar_settings(container)
    assert settings.transport_security == "mtls"
    assert settings.internal_token_file == Path("/etc/swapline/internal-token/token")
    tls_volume = next(volume for volume in pod_spec(objects, "triton")["volumes"] if volume["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == certificate["secretName"]
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[probe.index("--server-name") + 1] in certificate["dnsNames"]
    assert TRITON_HOST in certificate["dnsNames"]


def sidecar_environment(objects: list[Manifest], root: Path) -> dict[str, str]:
    """The sidecar's env, with each mounted Secret file written under `root` and its setting pointing there."""
    volumes = {volume["name"]: volume for volume in pod_spec(objects, "triton")["volumes"]}
    container = sidecar(objects)
    environment = runtime_environment(container)
    for name, path in environment.items():
        if name.endswith("_FILE"):
            directory, file_name = posixpath.split(path)
            (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == directory]
            secret = volumes[mount["name"]]["secret"]
            (item,) = [item for item in secret["items"] if item["path"] == file_name]
            local = root / path.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(secret_data(objects, secret["secretName"])[item["key"]])
            environment[name] = str(local)
    return environment


@pytest.mark.parametrize("transport", ["tls", "mtls"])
def test_the_sidecar_probe_passes_with_its_generated_certificate_and_fails_for_another_name(
    transport: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = objects_of(render({"security": {"transportSecurity": transport}}))
    arguments = probe_arguments(sidecar(objects))
    misnamed = with_option(arguments, "--server-name", "demo-swapline-decoder.media.svc.cluster.local")
    environment = sidecar_environment(objects, tmp_path)

    async def probe_exit_codes() -> list[int]:
        listen = {**environment, f"{PREFIX}HOST": "127.0.0.1", f"{PREFIX}PORT": "0"}
        running = await start_server(load_settings(ServerSettings, PREFIX, listen), stand_in_bindings("residency"))
        try:
            for name, value in {**environment, f"{PREFIX}PORT": str(running.port)}.items():
                monkeypatch.setenv(name, value)
            return [await asyncio.to_thread(health_probe.main, argv) for argv in (arguments, misnamed)]
        finally:
            await running.stop(None)

    assert asyncio.run(probe_exit_codes()) == [0, 1]


def test_open_mode_probes_the_sidecar_port_with_the_kubelets_grpc_probe() -> None:
    container = sidecar(scenario_objects("open-mode"))
    assert container["livenessProbe"]["grpc"] == {"port": container["ports"][0]["containerPort"]}
    assert sidecar_settings(container).auth_mode == "open"


def test_object_storage_gives_the_sidecar_no_repository_files() -> None:
    storage = {"source": "objectStorage", "objectStorage": {"url": "s3://bucket/triton_models"}}
    objects = objects_of(render({"triton": {"modelRepository": storage}}))
    container = sidecar(objects)
    assert f"{PREFIX}MODEL_REPOSITORY" not in env_values(container)
    assert [mount["name"] for mount in container["volumeMounts"]] == ["residency-tmp", "tls", "internal-token"]


def test_the_sidecar_sees_the_gpu_only_when_asked() -> None:
    assert "NVIDIA_VISIBLE_DEVICES" not in env_values(sidecar(scenario_objects("default")))
    container = sidecar(objects_of(render({"triton": {"residency": {"nvidiaVisibleDevices": "all"}}})))
    env = env_values(container)
    assert (env["NVIDIA_VISIBLE_DEVICES"], env["NVIDIA_DRIVER_CAPABILITIES"]) == ("all", "utility")
    assert GPU_RESOURCE not in container["resources"]["limits"]


def test_the_budget_and_further_settings_become_sidecar_variables() -> None:
    values = {"triton": {"residency": {"memoryBudgetBytes": 8 * 2**30, "settings": {"gpu_index": 1}}}}
    settings = sidecar_settings(sidecar(objects_of(render(values))))
    assert (settings.memory_budget_bytes, settings.gpu_index) == (8 * 2**30, 1)


def test_the_settings_cannot_repeat_what_the_chart_sets() -> None:
    message = render_error({"triton": {"residency": {"settings": {"pinned_models": "face_swapper"}}}})
    assert "SWAPLINE_RESIDENCY_PINNED_MODELS" in message


def test_disabled_residency_leaves_triton_serving_every_model_itself() -> None:
    objects = objects_of(render(DISABLED))
    assert [container["name"] for container in containers_of(workload_of(objects, "triton"))] == ["triton"]
    args = triton_args(objects)
    assert not [arg for arg in args if arg.startswith(("--model-control-mode", "--load-model"))]
    assert "residency" not in service_ports(objects)
    assert "SWAPLINE_WORKER_RESIDENCY_TARGET" not in worker_env(objects)
    assert not [volume for volume in pod_spec(objects, "triton")["volumes"] if "secret" in volume]
    assert not [flow for flow in allowed_flows(objects) if flow[1:] == ("triton", "residency")]
    policy_ports = {
        port["port"]
        for policy in of_kind(objects, "NetworkPolicy")
        for rule in [*policy["spec"].get("ingress", []), *policy["spec"].get("egress", [])]
        for port in rule.get("ports", [])
    }
    assert 50066 not in policy_ports
    assert component_name("triton") + "-tls" not in {
        secret["metadata"]["name"] for secret in of_kind(objects, "Secret")
    }


def test_a_negative_budget_is_rejected() -> None:
    message = render_error({"triton": {"residency": {"memoryBudgetBytes": -1}}})
    assert "/triton/residency/memoryBudgetBytes" in message
    assert "minimum: got -1, want 0" in message


def test_an_unknown_residency_key_is_rejected() -> None:
    assert "additional properties 'budget' not allowed" in render_error({"triton": {"residency": {"budget": 1}}})


def test_a_budget_needs_the_repository_files() -> None:
    values = {
        "triton": {
            "modelRepository": {"source": "objectStorage", "objectStorage": {"url": "s3://bucket/triton_models"}},
            "residency": {"memoryBudgetBytes": 2**30},
        }
    }
    assert "memoryBudgetBytes needs triton.modelRepository.source pvc" in render_error(values)


def test_extra_args_cannot_choose_the_model_control_mode() -> None:
    message = render_error({"triton": {"extraArgs": ["--model-control-mode=poll"]}})
    assert "sets --model-control-mode=explicit itself" in message


@pytest.mark.parametrize(
    "triton", [{"replicaCount": 2}, {"autoscaling": {"enabled": True}}], ids=["two-replicas", "autoscaled"]
)
def test_the_sidecar_is_refused_with_several_triton_pods(triton: dict[str, Any]) -> None:
    # Autoscaling needs its metrics scraped; a Prometheus of the user's own does here.
    scrape = {"autoscaling": {"prometheusScrape": "external"}}
    assert "With several Triton pods" in render_error({"triton": triton, **scrape})
    objects = objects_of(render({"triton": {**triton, "residency": {"enabled": False}}, **scrape}))
    assert [item["name"] for item in containers_of(workload_of(objects, "triton"))] == ["triton"]

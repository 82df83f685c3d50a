"""What every rendered scenario must hold: resources, probes, security, GPU placement, headless gRPC."""

from __future__ import annotations

import re

import pytest
import yaml

from services.common.gpu_catalog import catalog_from_data
from tests.deploy.chart_render import (
    GPU_RESOURCE,
    Manifest,
    all_containers,
    component_name,
    containers_of,
    env_values,
    labels_match,
    named,
    of_kind,
    pod_spec,
    scenario_names,
    scenario_objects,
    scenario_setting,
    scenario_values,
    workload_of,
    workloads,
)

SCENARIOS = ["default", *scenario_names()]
GRPC_TARGET = re.compile(
    r"^dns:///(?P<service>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc\.cluster\.local:(?P<port>\d+)$"
)
# Container ports speaking gRPC: the public (or only) one, the gateway's internal chunk queue, and Triton's
# model residency sidecar.
GRPC_PORT_NAMES = ("grpc", "internal", "residency")
# Workloads allowed to run as root, and why: NVML device nodes and other users' GPU processes.
ROOT_ALLOWED = {"exporter"}


def component(workload: Manifest) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_has_resources_probes_and_a_security_context(scenario: str) -> None:
    containers = list(all_containers(scenario_objects(scenario)))
    assert len(containers) >= 6
    for workload, container in containers:
        where = f"{workload['metadata']['name']}/{container['name']}"
        resources = container["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[bound]), where
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in container, f"{where} has no {probe}"
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        assert "add" not in security["capabilities"], where
        assert not security.get("privileged", False), where


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_run_as_non_root_except_the_exporter(scenario: str) -> None:
    for workload in workloads(scenario_objects(scenario)):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        if component(workload) in ROOT_ALLOWED:
            continue
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for container in containers_of(workload):
            assert container["securityContext"].get("runAsUser", 1) != 0
            assert container["securityContext"].get("runAsNonRoot", True) is True


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_with_an_fs_group_reown_volumes_only_on_a_root_mismatch(scenario: str) -> None:
    # Kubernetes' default (Always) walks the whole media volume at every pod start.
    grouped = [
        workload["spec"]["template"]["spec"]["securityContext"]
        for workload in workloads(scenario_objects(scenario))
        if "fsGroup" in workload["spec"]["template"]["spec"]["securityContext"]
    ]
    assert grouped
    assert all(context.get("fsGroupChangePolicy") == "OnRootMismatch" for context in grouped)


# Components with a `gpu` block and its default count; no other component ever asks for a GPU.
GPU_COUNT_DEFAULTS = {"triton": 1, "decoder": 0, "encoder": 0, "worker": 0}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpus_are_requested_only_by_their_gpu_blocks(scenario: str) -> None:
    objects = scenario_objects(scenario)
    for workload, container in all_containers(objects):
        name = component(workload)
        gpu_count = 0
        # A component's own container; a sidecar (Triton's residency service) asks for none.
        if name in GPU_COUNT_DEFAULTS and container["name"] == name:
            gpu_count = scenario_setting(scenario, f"{name}.gpu.count", GPU_COUNT_DEFAULTS[name])
        resources = container["resources"]
        assert resources["limits"].get(GPU_RESOURCE, 0) == gpu_count, workload["metadata"]["name"]
        assert resources["requests"].get(GPU_RESOURCE, 0) == gpu_count, workload["metadata"]["name"]


def test_cpu_minimal_requests_no_gpu_and_runs_no_exporter() -> None:
    objects = scenario_objects("cpu-minimal")
    assert not of_kind(objects, "DaemonSet")
    assert all(GPU_RESOURCE not in item["resources"]["limits"] for _, item in all_containers(objects))
    triton = pod_spec(objects, "triton")
    assert "affinity" not in triton and "tolerations" not in triton
    assert "--allow-gpu-metrics=false" in triton["containers"][0]["args"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_triton_has_models_an_engine_cache_and_a_model_load_sized_startup(scenario: str) -> None:
    pod = workload_of(scenario_objects(scenario), "triton")["spec"]["template"]["spec"]
    (container,) = [item for item in pod["containers"] if item["name"] == "triton"]
    assert container["image"].startswith("nvcr.io/nvidia/tritonserver:")
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert not mounts["/cache/trt"].get("readOnly", False)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert set(volumes[mounts["/cache/trt"]["name"]]) & {"emptyDir", "persistentVolumeClaim"}
    repository = next(arg for arg in container["args"] if arg.startswith("--model-repository="))
    location = repository.split("=", 1)[1]
    if location.startswith("/"):
        assert "persistentVolumeClaim" in volumes[mounts[location]["name"]]
    else:
        assert location.startswith(("s3://", "gs://", "as://"))
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert startup["httpGet"]["path"] == "/v2/health/ready"


@pytest.mark.parametrize("scenario", ["default", "gpu-keda", "gpu-hpa", "gpu-video"])
def test_triton_needs_a_gpu_node_of_the_chosen_products(scenario: str) -> None:
    pod = pod_spec(scenario_objects(scenario), "triton")
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    (expression,) = terms[0]["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product"
    products = scenario_setting(scenario, "triton.gpu.products", [])
    assert expression.get("values", []) == products
    assert expression["operator"] == ("In" if products else "Exists")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_grpc_service_is_headless(scenario: str) -> None:
    services = of_kind(scenario_objects(scenario), "Service")
    grpc_services = [
        item for item in services if any(port["name"] in GRPC_PORT_NAMES for port in item["spec"]["ports"])
    ]
    assert len(grpc_services) >= 6
    for service in grpc_services:
        assert service["spec"]["clusterIP"] == "None", service["metadata"]["name"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grpc_targets_name_headless_services_that_reach_a_grpc_container_port(scenario: str) -> None:
    objects = scenario_objects(scenario)
    targets = 0
    for _, container in all_containers(objects):
        for name, value in env_values(container).items():
            if not (name.endswith("_TARGET") or name.endswith("_TRITON_URL")):
                continue
            # The residency sidecar dials its own pod's Triton over loopback (test_chart_residency).
            if name == "SWAPLINE_RESIDENCY_TRITON_URL":
                continue
            match = GRPC_TARGET.match(value)
            assert match, f"{name}={value}"
            assert match["namespace"] == "media"
            service = named(objects, "Service", match["service"])
            assert service["spec"]["clusterIP"] == "None"
            (port,) = [port for port in service["spec"]["ports"] if port["port"] == int(match["port"])]
            assert port["name"] in GRPC_PORT_NAMES
            selector = service["spec"]["selector"]
            backends = [
                workload
                for workload in workloads(objects)
                if labels_match(selector, workload["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(backends) == 1
            ports = {
                item["name"]: item["containerPort"] for served in containers_of(backends[0]) for item in served["ports"]
            }
            assert ports[port["targetPort"]] == port["port"]
            targets += 1
    assert targets >= 9


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_outlive_the_prestop_sleep_and_the_drain(scenario: str) -> None:
    for workload, container in all_containers(scenario_objects(scenario)):
        pod = workload["spec"]["template"]["spec"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        sleep = int(command[1])
        assert sleep > 0
        env = env_values(container)
        drain = next((float(value) for key, value in env.items() if key.endswith("_DRAIN_SECONDS")), None)
        if container["name"] == "triton":
            timeout = next(arg for arg in container["args"] if arg.startswith("--exit-timeout-secs="))
            drain = float(timeout.split("=")[1])
        assert pod["terminationGracePeriodSeconds"] > sleep + (drain or 0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grpc_servers_bound_connection_age(scenario: str) -> None:
    for workload, container in all_containers(scenario_objects(scenario)):
        env = env_values(container)
        ages = [float(value) for key, value in env.items() if key.endswith("_MAX_CONNECTION_AGE_SECONDS")]
        if any(port["name"] == "grpc" for port in container["ports"]) and component(workload) != "triton":
            assert ages == [300.0], workload["metadata"]["name"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gateway_decoder_and_encoder_share_one_media_volume(scenario: str) -> None:
    objects = scenario_objects(scenario)
    claims = set()
    for service in ("gateway", "decoder", "encoder"):
        pod = workload_of(objects, service)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        media_root = env_values(container)[f"SWAPLINE_{service.upper()}_MEDIA_ROOT"]
        (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == media_root]
        volume = next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])
        claims.add(volume["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1
    worker = workload_of(objects, "worker")["spec"]["template"]["spec"]
    assert [volume for volume in worker["volumes"] if "persistentVolumeClaim" in volume] == []
    created = [claim for claim in of_kind(objects, "PersistentVolumeClaim") if claim["metadata"]["name"] in claims]
    for claim in created:
        assert claim["spec"]["accessModes"] in (["ReadWriteMany"], ["ReadWriteOnce"])


def test_the_default_media_claim_is_read_write_many() -> None:
    claim = named(scenario_objects("default"), "PersistentVolumeClaim", "demo-swapline-media")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_sqlite_runs_one_gateway_on_its_own_volume() -> None:
    objects = scenario_objects("default")
    gateway = workload_of(objects, "gateway")
    assert gateway["spec"]["replicas"] == 1
    assert gateway["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    url = env_values(container)["SWAPLINE_GATEWAY_DATABASE_URL"]
    assert url.startswith("sqlite:////")
    database_dir = url.removeprefix("sqlite:///").rsplit("/", 1)[0]
    (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == database_dir]
    volume = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    claim = named(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_postgresql_reads_its_url_from_a_secret() -> None:
    gateway = workload_of(scenario_objects("postgresql"), "gateway")
    assert "replicas" not in gateway["spec"]
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    (url,) = [item for item in container["env"] if item["name"] == "SWAPLINE_GATEWAY_DATABASE_URL"]
    assert url["valueFrom"] == {"secretKeyRef": {"name": "swapline-postgresql", "key": "url"}}
    objects = scenario_objects("object-storage")
    (container,) = workload_of(objects, "gateway")["spec"]["template"]["spec"]["containers"]
    (url,) = [item for item in container["env"] if item["name"] == "SWAPLINE_GATEWAY_DATABASE_URL"]
    secret = named(objects, "Secret", url["valueFrom"]["secretKeyRef"]["name"])
    assert secret["stringData"][url["valueFrom"]["secretKeyRef"]["key"]].startswith("postgresql://")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_deployment_has_a_disruption_budget(scenario: str) -> None:
    objects = scenario_objects(scenario)
    budgets = of_kind(objects, "PodDisruptionBudget")
    values = scenario_values(scenario) if scenario != "default" else {}
    deployments = [workload for workload in workloads(objects) if workload["kind"] == "Deployment"]
    assert len(deployments) >= 6
    for workload in deployments:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if values.get(component(workload), {}).get("pdb", {}).get("enabled", True):
            assert [b for b in budgets if labels_match(b["spec"]["selector"]["matchLabels"], labels)]


def test_the_advisor_catalog_override_is_a_catalog_the_advisor_accepts() -> None:
    objects = scenario_objects("gpu-keda")
    config_map = named(objects, "ConfigMap", "demo-swapline-advisor-catalog")
    catalog = catalog_from_data(yaml.safe_load(config_map["data"]["catalog.yaml"]))
    assert [gpu.name for gpu in catalog.gpus] == ["L4 24GB", "A10G 24GB"]
    pod = workload_of(objects, "advisor")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    path = env_values(container)["SWAPLINE_ADVISOR_CATALOG_PATH"]
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert path.rsplit("/", 1)[1] in config_map["data"]


def test_without_a_catalog_the_advisor_keeps_the_packaged_one() -> None:
    objects = scenario_objects("default")
    (container,) = workload_of(objects, "advisor")["spec"]["template"]["spec"]["containers"]
    assert "SWAPLINE_ADVISOR_CATALOG_PATH" not in env_values(container)
    assert not [item for item in of_kind(objects, "ConfigMap") if "catalog" in item["metadata"]["name"]]


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler() -> None:
    objects = scenario_objects("gpu-hpa")
    autoscalers = of_kind(objects, "HorizontalPodAutoscaler")
    assert not of_kind(objects, "ScaledObject")
    targets = {item["spec"]["scaleTargetRef"]["name"]: item for item in autoscalers}
    scaled = ("worker", "decoder", "detector", "encoder", "triton")
    assert set(targets) == {component_name(name) for name in scaled}
    for name in targets:
        assert "replicas" not in named(objects, "Deployment", name)["spec"]
    worker_metrics = {item["type"]: item for item in targets[component_name("worker")]["spec"]["metrics"]}
    assert worker_metrics["External"]["external"]["metric"]["name"] == "swapline_gateway_chunks_open"
    triton_metrics = {item["type"]: item for item in targets[component_name("triton")]["spec"]["metrics"]}
    assert set(triton_metrics) == {"Pods"}
    assert triton_metrics["Pods"]["pods"]["metric"]["name"] == "nv_inference_pending_request_count"

"""Triton's pods on GPUs: updates that need no spare GPU, an engine cache per GPU model that every pod can
attach, and connections that age out so that clients find new pods."""

from __future__ import annotations

import os
import posixpath
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest

from services.triton.model_config import read_model_config, repository_models
from services.triton.tensorrt_config import TRT_ENGINE_CACHE
from tests.deploy.chart_render import (
    GPU_RESOURCE,
    REPO_ROOT,
    Manifest,
    objects_of,
    pod_spec,
    render,
    scenario_names,
    scenario_objects,
    scenario_setting,
    workload_of,
)

SCENARIOS = ["default", *scenario_names()]
GPU_SCENARIOS = [name for name in SCENARIOS if int(scenario_setting(name, "triton.gpu.count", 1)) > 0]
PRODUCTION_REPOSITORY = REPO_ROOT / "triton_models"
# Several Triton pods: the residency sidecar manages one pod's models, and autoscaling reads Prometheus.
SEVERAL_PODS = [
    {"replicaCount": 2, "residency": {"enabled": False}},
    {"autoscaling": {"enabled": True}, "residency": {"enabled": False}},
]
EXTERNAL_SCRAPE = {"autoscaling": {"prometheusScrape": "external"}}


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


def triton_container(objects: list[Manifest]) -> Manifest:
    (container,) = [item for item in pod_spec(objects, "triton")["containers"] if item["name"] == "triton"]
    return container


def cached_triton(persistence: dict[str, Any], triton: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"triton": {**(triton or {}), "engineCache": {"persistence": {"enabled": True, **persistence}}}}


@pytest.mark.parametrize("scenario", GPU_SCENARIOS)
def test_a_gpu_triton_update_never_adds_a_pod_before_one_leaves(scenario: str) -> None:
    strategy = workload_of(scenario_objects(scenario), "triton")["spec"]["strategy"]
    if strategy["type"] == "RollingUpdate":
        assert strategy["rollingUpdate"]["maxSurge"] == 0
        assert strategy["rollingUpdate"]["maxUnavailable"] >= 1
    else:
        assert strategy == {"type": "Recreate"}


def test_a_claim_on_one_node_is_released_before_the_new_pod_starts() -> None:
    objects = objects_of(render(cached_triton({"accessModes": ["ReadWriteOnce"]})))
    assert workload_of(objects, "triton")["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("access_mode", ["ReadWriteOnce", "ReadWriteOncePod"])
@pytest.mark.parametrize("several", SEVERAL_PODS, ids=["two-replicas", "autoscaled"])
def test_several_triton_pods_are_refused_one_claim_that_attaches_to_one_node(
    several: dict[str, Any], access_mode: str
) -> None:
    message = render_error({**cached_triton({"accessModes": [access_mode]}, several), **EXTERNAL_SCRAPE})
    assert "cannot start: set accessModes [ReadWriteMany]" in message
    shared = objects_of(render({**cached_triton({"accessModes": ["ReadWriteMany"]}, several), **EXTERNAL_SCRAPE}))
    assert workload_of(shared, "triton")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    per_pod = objects_of(render({"triton": several, **EXTERNAL_SCRAPE}))
    volumes = {volume["name"]: volume for volume in pod_spec(per_pod, "triton")["volumes"]}
    assert "emptyDir" in volumes["engine-cache"]


def test_triton_closes_connections_at_the_services_connection_age() -> None:
    args = triton_container(scenario_objects("default"))["args"]
    assert "--grpc-max-connection-age=300000" in args
    assert "--grpc-max-connection-age-grace=30000" in args
    forever = triton_container(objects_of(render({"grpc": {"maxConnectionAgeSeconds": 0}})))["args"]
    assert not [arg for arg in forever if arg.startswith("--grpc-max-connection-age")]


def test_every_tensorrt_config_reads_engines_from_the_link() -> None:
    for model in repository_models(PRODUCTION_REPOSITORY):
        config = read_model_config(PRODUCTION_REPOSITORY, model)
        for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
            assert accelerator.parameters["trt_engine_cache_path"] == TRT_ENGINE_CACHE, model


@pytest.mark.parametrize("scenario", GPU_SCENARIOS)
def test_the_engine_cache_link_lies_in_a_pod_own_folder_beside_the_shared_cache(scenario: str) -> None:
    objects = scenario_objects(scenario)
    container = triton_container(objects)
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TRT_ENGINE_CACHE_LINK"] == TRT_ENGINE_CACHE
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(objects, "triton")["volumes"]}
    link_folder = volumes[mounts[posixpath.dirname(TRT_ENGINE_CACHE)]]
    assert "emptyDir" in link_folder
    cache = volumes[mounts[env["TRT_ENGINE_CACHE_ROOT"]]]
    kept = scenario_setting(scenario, "triton.engineCache.persistence.enabled", False)
    assert ("persistentVolumeClaim" in cache) == kept
    assert cache is not link_folder
    assert not env["TRT_ENGINE_CACHE_ROOT"].startswith(posixpath.dirname(TRT_ENGINE_CACHE))


def _start(tmp_path: Path, gpu_names: tuple[str, ...] | None, link_folder: str) -> subprocess.CompletedProcess[str]:
    """Runs the Triton container's command as the chart renders it, with its args and with stand-ins for
    nvidia-smi (answering `gpu_names`, or failing as it does without a driver) and tritonserver (recording
    its arguments and where the link points)."""
    container = triton_container(scenario_objects("default"))
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    smi = tools / "nvidia-smi"
    if gpu_names is None:
        smi.write_text(
            '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the driver"\nexit 9\n'
        )
    else:
        smi.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(f"'{name}'" for name in gpu_names) + "\n")
    server = tools / "tritonserver"
    server.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" "$(readlink "$TRT_ENGINE_CACHE_LINK")" > "$RECORD"\n')
    for tool in (smi, server):
        tool.chmod(0o755)
    (tmp_path / link_folder).mkdir(exist_ok=True)
    environment = {
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "TRT_ENGINE_CACHE_ROOT": str(tmp_path / "engines"),
        "TRT_ENGINE_CACHE_LINK": str(tmp_path / link_folder / "gpu"),
        "RECORD": str(tmp_path / f"{link_folder}.record"),
    }
    return subprocess.run(
        [*container["command"], *container["args"]], env=environment, capture_output=True, text=True, timeout=30
    )


def _recorded(tmp_path: Path, link_folder: str) -> list[str]:
    return (tmp_path / f"{link_folder}.record").read_text().splitlines()


def test_each_gpu_model_gets_its_own_engine_directory(tmp_path: Path) -> None:
    args = triton_container(scenario_objects("default"))["args"]
    l4 = _start(tmp_path, ("NVIDIA L4",), "l4-pod")
    assert l4.returncode == 0, l4.stderr
    *passed, target = _recorded(tmp_path, "l4-pod")
    assert passed == args
    assert target == str(tmp_path / "engines" / "NVIDIA-L4")
    (tmp_path / "engines" / "NVIDIA-L4" / "built.engine").write_bytes(b"an L4 engine")
    # The same pod's container again (a restart keeps its emptyDir and the link in it).
    assert _start(tmp_path, ("NVIDIA L4",), "l4-pod").returncode == 0
    assert _recorded(tmp_path, "l4-pod")[-1] == target
    a10g = _start(tmp_path, ("NVIDIA A10G",), "a10g-pod")
    assert a10g.returncode == 0, a10g.stderr
    assert _recorded(tmp_path, "a10g-pod")[-1] == str(tmp_path / "engines" / "NVIDIA-A10G")
    assert not (tmp_path / "a10g-pod" / "gpu" / "built.engine").exists()
    assert (tmp_path / "l4-pod" / "gpu" / "built.engine").read_bytes() == b"an L4 engine"
    mixed = _start(tmp_path, ("NVIDIA L4", "NVIDIA A10G"), "mixed-pod")
    assert mixed.returncode == 0, mixed.stderr
    assert _recorded(tmp_path, "mixed-pod")[-1] == str(tmp_path / "engines" / "NVIDIA-A10G+NVIDIA-L4")


def test_without_a_visible_gpu_triton_does_not_start(tmp_path: Path) -> None:
    started = _start(tmp_path, None, "pod")
    assert started.returncode != 0
    assert "nvidia-smi shows no GPU" in started.stderr
    assert not (tmp_path / "pod.record").exists()
    assert not (tmp_path / "engines").exists()


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_a_triton_pod_serves_every_model_from_each_of_its_gpus(gpus: int) -> None:
    # The pod is given `gpus` GPUs and shows Triton all of them; the model configs leave their GPU instance groups
    # unpinned (tests/triton/test_instance_placement.py), so Triton puts each model's instances on every one.
    container = triton_container(objects_of(render({"triton": {"gpu": {"count": gpus}}})))
    assert container["resources"]["limits"][GPU_RESOURCE] == container["resources"]["requests"][GPU_RESOURCE] == gpus
    narrowing = {"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"}
    assert not [variable for variable in container.get("env", []) if variable["name"] in narrowing]
    for model in repository_models(PRODUCTION_REPOSITORY):
        groups = read_model_config(PRODUCTION_REPOSITORY, model).instance_group
        assert [list(group.gpus) for group in groups] == [[]], model

"""The node's frame memory directory in the pods that stream frames: the decoder and workers send, the encoder takes."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from tests.deploy.chart_render import (
    containers_of,
    env_values,
    objects_of,
    pod_spec,
    render,
    scenario_objects,
    scenario_setting,
    workload_of,
    workloads,
)

SCENARIO = "gpu-video"
# Component -> whether it sends frames (and so has a budget for them).
FRAME_COMPONENTS = {"decoder": True, "worker": True, "encoder": False}


def frame_memory_volumes(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [volume for volume in pod.get("volumes", []) if volume["name"] == "frame-memory"]


@pytest.mark.parametrize(("component", "sends"), FRAME_COMPONENTS.items())
def test_frame_components_mount_the_nodes_directory_and_are_told_where(component: str, sends: bool) -> None:
    objects = scenario_objects(SCENARIO)
    pod = pod_spec(objects, component)
    host_path = scenario_setting(SCENARIO, "frameMemory.hostPath", None)
    assert frame_memory_volumes(pod) == [{"name": "frame-memory", "hostPath": {"path": host_path, "type": "Directory"}}]
    (container,) = containers_of(workload_of(objects, component))
    mounts = [mount for mount in container["volumeMounts"] if mount["name"] == "frame-memory"]
    assert mounts == [{"name": "frame-memory", "mountPath": "/frame-memory"}]
    env = env_values(container)
    prefix = f"SWAPLINE_{component.upper()}_"
    assert env[f"{prefix}FRAME_MEMORY_DIR"] == "/frame-memory"
    assert env.get(f"{prefix}FRAME_MEMORY_BYTES") == ("1073741824" if sends else None)


def test_services_that_stream_no_frames_get_no_frame_memory() -> None:
    objects = scenario_objects(SCENARIO)
    for workload in workloads(objects):
        name = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if name not in FRAME_COMPONENTS:
            assert frame_memory_volumes(workload["spec"]["template"]["spec"]) == [], name


def test_by_default_no_pod_mounts_a_host_directory_for_frames() -> None:
    for workload in workloads(objects_of(render())):
        pod = workload["spec"]["template"]["spec"]
        assert frame_memory_volumes(pod) == []
        for container in pod["containers"]:
            assert not any(name.endswith("FRAME_MEMORY_DIR") for name in env_values(container))


@pytest.mark.parametrize(
    ("setting", "value"), [("hostPath", "dev/shm/frames"), ("mountPath", "frames"), ("maxBytes", 1024)]
)
def test_the_schema_refuses_a_relative_path_or_a_budget_under_16_mib(setting: str, value: Any) -> None:
    with pytest.raises(helm_python.HelmError, match="frameMemory"):
        render({"frameMemory": {"enabled": True, setting: value}})

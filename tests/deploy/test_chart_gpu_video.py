"""Decoder, encoder and workers on GPU nodes: GPU requests, placement, driver capabilities and backends."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from tests.deploy.chart_render import (
    GPU_RESOURCE,
    containers_of,
    env_values,
    objects_of,
    pod_spec,
    render,
    scenario_objects,
    scenario_setting,
    workload_of,
)

GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
VIDEO_CAPABILITIES = "compute,utility,video"
# Component -> (the values key naming its backend, the variable the chart sets from it).
BACKEND_KEYS = {
    "decoder": ("backend", "SWAPLINE_DECODER_BACKEND"),
    "encoder": ("backend", "SWAPLINE_ENCODER_BACKEND"),
    "worker": ("device", "SWAPLINE_WORKER_DEVICE"),
}
GPU_COMPONENTS = tuple(BACKEND_KEYS)


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    return str(caught.value)


def product_expression(pod: dict[str, Any]) -> dict[str, Any]:
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = required["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product"
    found: dict[str, Any] = expression
    return found


def backend_variable(objects: list[dict[str, Any]], component: str) -> str | None:
    (container,) = containers_of(workload_of(objects, component))
    return env_values(container).get(BACKEND_KEYS[component][1])


@pytest.mark.parametrize("component", GPU_COMPONENTS)
def test_a_gpu_component_asks_for_its_gpus_and_the_video_capability(component: str) -> None:
    pod = pod_spec(scenario_objects("gpu-video"), component)
    (container,) = pod["containers"]
    count = scenario_setting("gpu-video", f"{component}.gpu.count", None)
    assert count == 1
    assert container["resources"]["limits"][GPU_RESOURCE] == count
    assert container["resources"]["requests"][GPU_RESOURCE] == count
    environment = env_values(container)
    assert environment["NVIDIA_DRIVER_CAPABILITIES"] == VIDEO_CAPABILITIES
    key, variable = BACKEND_KEYS[component]
    assert environment[variable] == scenario_setting("gpu-video", f"{component}.{key}", None)


@pytest.mark.parametrize("component", GPU_COMPONENTS)
def test_a_gpu_component_lands_on_gpu_nodes_of_its_products(component: str) -> None:
    pod = pod_spec(scenario_objects("gpu-video"), component)
    assert pod["tolerations"].count(GPU_TAINT) == 1
    products = scenario_setting("gpu-video", f"{component}.gpu.products", [])
    expression = product_expression(pod)
    assert expression["operator"] == ("In" if products else "Exists")
    assert expression.get("values", []) == products


def test_the_scenario_sets_each_backend_a_gpu_may_run() -> None:
    objects = scenario_objects("gpu-video")
    backends = {component: backend_variable(objects, component) for component in GPU_COMPONENTS}
    assert backends == {"decoder": "nvdec", "encoder": "auto", "worker": "cuda"}


@pytest.mark.parametrize("component", GPU_COMPONENTS)
def test_without_gpus_a_component_stays_off_gpu_nodes(component: str) -> None:
    pod = pod_spec(scenario_objects("default"), component)
    (container,) = pod["containers"]
    assert GPU_RESOURCE not in container["resources"]["limits"]
    assert GPU_RESOURCE not in container["resources"]["requests"]
    assert "NVIDIA_DRIVER_CAPABILITIES" not in env_values(container)
    assert backend_variable(scenario_objects("default"), component) is None
    assert "affinity" not in pod and "tolerations" not in pod


def test_the_user_tolerations_and_affinity_are_kept() -> None:
    zone = {"key": "dedicated", "operator": "Equal", "value": "video", "effect": "NoSchedule"}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["video"]}]}]
            }
        }
    }
    decoder = {"gpu": {"count": 2, "products": ["NVIDIA-L4"]}, "tolerations": [zone], "affinity": affinity}
    pod = pod_spec(objects_of(render({"decoder": decoder})), "decoder")
    assert pod["tolerations"] == [zone, GPU_TAINT]
    assert pod["affinity"] == affinity
    (container,) = pod["containers"]
    assert container["resources"]["limits"][GPU_RESOURCE] == 2
    assert env_values(container)["SWAPLINE_DECODER_BACKEND"] == "auto"


@pytest.mark.parametrize(
    ("component", "key", "bad"),
    [("decoder", "backend", "gpu"), ("encoder", "backend", "x265"), ("worker", "device", "rocm")],
)
def test_a_backend_outside_its_choices_is_rejected(component: str, key: str, bad: str) -> None:
    message = render_error({component: {"gpu": {"count": 1, "products": []}, key: bad}})
    assert f"/{component}/{key}" in message


@pytest.mark.parametrize(
    ("component", "key", "needs_gpu"),
    [("decoder", "backend", "nvdec"), ("encoder", "backend", "nvenc"), ("worker", "device", "cuda")],
)
def test_a_gpu_only_backend_needs_gpus(component: str, key: str, needs_gpu: str) -> None:
    message = render_error({component: {key: needs_gpu}})
    assert f"/{component}/{key}" in message
    rendered = render({component: {key: needs_gpu, "gpu": {"count": 1, "products": []}}})
    assert backend_variable(objects_of(rendered), component) == needs_gpu


def test_the_gpu_block_is_closed_and_counts_whole_gpus() -> None:
    assert "additional properties 'resourceName' not allowed" in render_error(
        {"encoder": {"gpu": {"count": 1, "products": [], "resourceName": "nvidia.com/mig-1g.10gb"}}}
    )
    assert "/worker/gpu/count" in render_error({"worker": {"gpu": {"count": -1, "products": []}}})


@pytest.mark.parametrize(("frame_format", "scenario"), [("auto", "gpu-video"), ("auto", None), ("rgb24", None)])
def test_workers_get_the_frame_format_their_deployment_chooses(frame_format: str, scenario: str | None) -> None:
    values = {} if frame_format == "auto" else {"worker": {"frameFormat": frame_format}}
    objects = scenario_objects(scenario) if scenario else objects_of(render(values))
    (container,) = containers_of(workload_of(objects, "worker"))
    assert env_values(container)["SWAPLINE_WORKER_FRAME_FORMAT"] == frame_format


def test_a_frame_format_the_worker_does_not_know_is_refused() -> None:
    assert "frameFormat" in render_error({"worker": {"frameFormat": "yuv444"}})

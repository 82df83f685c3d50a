"""Renders the swapline chart with Helm's own code (helm-python-sdk) and hands back Kubernetes objects."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "swapline"
SCENARIO_DIR = CHART_DIR / "ci"
DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"
RELEASE = "demo"
NAMESPACE = "media"
KUBERNETES_VERSION = "1.30"
# The scenarios the acceptance names; the ci/ folder may hold more, and every file there is rendered.
REQUIRED_SCENARIOS = ("cpu-minimal", "gpu-keda", "gpu-hpa", "monitoring-on", "postgresql")
PYTHON_SERVICES = ("gateway", "worker", "decoder", "detector", "encoder", "advisor", "exporter")
GPU_RESOURCE = "nvidia.com/gpu"

helm_python.disable_logging()

Manifest = dict[str, Any]
# libyaml's parser where PyYAML was built with it: the rendered scenarios are parsed many times over.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def scenario_names() -> list[str]:
    return sorted(path.name.removesuffix("-values.yaml") for path in SCENARIO_DIR.glob("*-values.yaml"))


def scenario_values(name: str) -> dict[str, Any]:
    """A ci/ file parsed by Helm's own values reader (what `helm install -f` does)."""
    return helm_python.values_from_yaml((SCENARIO_DIR / f"{name}-values.yaml").read_text())


def render(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text; raises helm_python.HelmError where `helm template` would fail."""
    with helm_python.Chart.load(CHART_DIR) as chart:
        return chart.render(
            dict(values) if values is not None else None, name=RELEASE, namespace=NAMESPACE, is_install=True
        )


def objects_of(rendered: Mapping[str, str]) -> list[Manifest]:
    objects: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(document for document in yaml.load_all(text, Loader=_LOADER) if document)
    return objects


@functools.cache
def _rendered_scenario(name: str) -> tuple[tuple[str, str], ...]:
    values = None if name == "default" else scenario_values(name)
    return tuple(sorted(render(values).items()))


@functools.cache
def _scenario_objects(name: str) -> list[Manifest]:
    return objects_of(dict(_rendered_scenario(name)))


def scenario_objects(name: str) -> list[Manifest]:
    """The objects of the default values ("default") or of a ci/ scenario; rendered and parsed once."""
    return copy.deepcopy(_scenario_objects(name))


def scenario_setting(name: str, path: str, default: Any) -> Any:
    """One value a scenario file sets, e.g. "triton.gpu.count"; `default` where values.yaml decides."""
    node: Any = {} if name == "default" else scenario_values(name)
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def pod_spec(objects: list[Manifest], component: str) -> Manifest:
    spec: Manifest = workload_of(objects, component)["spec"]["template"]["spec"]
    return spec


def scenario_notes(name: str) -> str:
    return next(text for path, text in _rendered_scenario(name) if path.endswith("NOTES.txt"))


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [item for item in objects if item["kind"] == kind]


def named(objects: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [item for item in of_kind(objects, kind) if item["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def component_name(component: str) -> str:
    return f"{RELEASE}-swapline-{component}"


def workloads(objects: list[Manifest]) -> list[Manifest]:
    return [item for item in objects if item["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def workload_of(objects: list[Manifest], component: str) -> Manifest:
    matches = [
        item
        for item in workloads(objects)
        if item["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(matches) == 1, f"expected one workload for {component}, found {len(matches)}"
    return matches[0]


def containers_of(workload: Manifest) -> list[Manifest]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def all_containers(objects: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    for workload in workloads(objects):
        for container in containers_of(workload):
            yield workload, container


def env_values(container: Manifest) -> dict[str, str]:
    """Literal env values; variables from the downward API or Secrets map to their source description."""
    values: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            values[variable["name"]] = variable["value"]
        else:
            values[variable["name"]] = f"valueFrom:{variable['valueFrom']}"
    return values


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())

"""Every model's instances on every GPU Triton sees: N GPUs simulated by Triton's placement rule.

Triton places a KIND_GPU instance group that lists no `gpus` on each visible GPU, `count` instances on each;
one that lists `gpus` only there (model_config.proto, instance_group). So a config that leaves `gpus` out
serves from every GPU of the machine or the pod, and one that names them would leave the others idle.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from services.common.torch_catalog import BUILT_IN_FACTORIES
from services.triton.embedded_repository import torch_config
from services.triton.model_config import read_model_config, repository_models

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
SIMULATED_GPUS = [1, 2, 4]


def placement(config: model_config_pb2.ModelConfig, visible_gpus: int) -> dict[int, int]:
    """Instances per GPU index, as Triton places the config's GPU instance groups over `visible_gpus` GPUs."""
    instances: Counter[int] = Counter()
    for group in config.instance_group:
        if group.kind != KIND_GPU:
            continue
        for gpu in group.gpus or range(visible_gpus):
            instances[gpu] += group.count
    return dict(instances)


@pytest.mark.parametrize("gpus", SIMULATED_GPUS)
@pytest.mark.parametrize("model", repository_models(PRODUCTION_REPOSITORY))
def test_every_production_model_serves_from_each_visible_gpu(model: str, gpus: int) -> None:
    config = read_model_config(PRODUCTION_REPOSITORY, model)
    assert placement(config, gpus) == {gpu: 1 for gpu in range(gpus)}


@pytest.mark.parametrize("gpus", SIMULATED_GPUS)
@pytest.mark.parametrize("instances", [1, 3])
@pytest.mark.parametrize("model", sorted(BUILT_IN_FACTORIES))
def test_the_embedded_gpu_twins_put_their_instances_on_each_visible_gpu(model: str, instances: int, gpus: int) -> None:
    production = read_model_config(PRODUCTION_REPOSITORY, model)
    derived = torch_config(production, BUILT_IN_FACTORIES[model], "fp16", "cuda", instances)
    assert placement(derived, gpus) == {gpu: instances for gpu in range(gpus)}


def test_a_group_that_names_its_gpus_would_leave_the_others_idle() -> None:
    # The rule the tests above rely on, shown on a pinned group: the second GPU gets nothing.
    config = model_config_pb2.ModelConfig()
    config.instance_group.add(kind=KIND_GPU, count=2, gpus=[0])
    assert placement(config, 2) == {0: 2}

import pytest

from services.cli.gpu_layout import (
    GpuLayout,
    decoder_gpu_env,
    default_frame_service_replicas,
    default_workers,
    describe_layout,
    plan_gpu_layout,
    visible_device,
    worker_gpu_env,
)
from services.common.errors import InvalidArgument


def test_workers_and_replicas_go_round_robin_over_the_gpus() -> None:
    assert plan_gpu_layout(2, 32, 5, 4) == GpuLayout(2, (0, 1, 0, 1, 0), (0, 1, 0, 1))
    assert plan_gpu_layout(3, 32, 4, 2) == GpuLayout(3, (0, 1, 2, 0), (0, 1))
    assert plan_gpu_layout(1, 16, 3, 2) == GpuLayout(1, (0, 0, 0), (0, 0))


def test_without_a_gpu_nothing_is_placed() -> None:
    assert plan_gpu_layout(0, 2, 3, 2) == GpuLayout(0, (None, None, None), (None, None))


def test_each_gpu_gets_an_equal_share_of_an_even_number_of_workers() -> None:
    layout = plan_gpu_layout(2, 32, 16, 4)
    assert layout.worker_gpus.count(0) == layout.worker_gpus.count(1) == 8
    assert layout.frame_service_gpus.count(0) == layout.frame_service_gpus.count(1) == 2


def test_a_worker_calls_a_replica_on_its_own_gpu_when_replicas_are_a_multiple_of_the_gpus() -> None:
    layout = plan_gpu_layout(2, 32, 16, 4)
    assert all(layout.frame_service_gpus[index % 4] == gpu for index, gpu in enumerate(layout.worker_gpus))


def test_default_workers_are_sized_to_the_gpus_and_the_cores() -> None:
    assert default_workers(0, 2) == 2
    assert default_workers(0, 64) == 2
    assert default_workers(1, 16) == 8
    assert default_workers(2, 32) == 16
    assert default_workers(2, 12) == 12
    assert default_workers(4, 2) == 4


def test_default_replicas_are_two_per_gpu_within_the_cores_and_a_multiple_of_the_gpus() -> None:
    assert default_frame_service_replicas(0, 64, 8) == 1
    assert default_frame_service_replicas(1, 16, 8) == 2
    assert default_frame_service_replicas(2, 32, 16) == 4
    assert default_frame_service_replicas(2, 16, 16) == 2
    assert default_frame_service_replicas(2, 24, 16) == 2
    assert default_frame_service_replicas(1, 4, 4) == 1
    assert default_frame_service_replicas(2, 2, 2) == 2
    assert default_frame_service_replicas(1, 64, 1) == 1


def test_sizes_left_out_get_the_defaults_and_sizes_given_are_kept() -> None:
    assert plan_gpu_layout(2, 32) == plan_gpu_layout(2, 32, 16, 4)
    assert plan_gpu_layout(0, 2) == plan_gpu_layout(0, 2, 2, 1)
    assert plan_gpu_layout(2, 32, workers=2).frame_service_replicas == 2
    assert plan_gpu_layout(2, 32, frame_service_replicas=1).workers == 16


@pytest.mark.parametrize(
    ("gpus", "cores", "workers", "replicas", "message"),
    [
        (-1, 4, None, None, "gpus is -1"),
        (1, 0, None, None, "cores is 0"),
        (1, 4, 0, None, "0 workers"),
        (1, 4, 2, 0, "0 frame-service replicas"),
    ],
)
def test_impossible_machines_and_sizes_are_refused(
    gpus: int, cores: int, workers: int | None, replicas: int | None, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        plan_gpu_layout(gpus, cores, workers, replicas)


def test_a_child_is_shown_its_gpu_through_the_stacks_own_visible_list() -> None:
    assert visible_device(1, {}) == "1"
    assert visible_device(1, {"CUDA_VISIBLE_DEVICES": "3, 5"}) == "5"
    assert visible_device(0, {"CUDA_VISIBLE_DEVICES": "GPU-8f2e,GPU-11aa"}) == "GPU-8f2e"
    with pytest.raises(InvalidArgument, match="GPU 1 is not among CUDA_VISIBLE_DEVICES='3'"):
        visible_device(1, {"CUDA_VISIBLE_DEVICES": "3"})


def test_the_environments_name_the_gpu_and_say_nothing_without_one() -> None:
    assert worker_gpu_env(1, {"CUDA_VISIBLE_DEVICES": "2,3"}) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert worker_gpu_env(None, {"CUDA_VISIBLE_DEVICES": "2,3"}) == {}
    assert decoder_gpu_env(1) == {"SWAPLINE_DECODER_GPU_ID": "1"}
    assert decoder_gpu_env(None) == {}


def test_the_layout_is_described_by_its_sizes_and_their_share_of_each_gpu() -> None:
    assert describe_layout(plan_gpu_layout(2, 32)) == (
        "16 worker(s) and 4 process(es) of each frame service over 2 GPU(s) (8 and 2 on each)"
    )
    assert describe_layout(plan_gpu_layout(2, 32, workers=5, frame_service_replicas=2)) == (
        "5 worker(s) and 2 process(es) of each frame service over 2 GPU(s) (2 to 3 and 1 on each)"
    )
    assert describe_layout(plan_gpu_layout(0, 2)) == "2 worker(s) and 1 process(es) of each frame service, no GPU"

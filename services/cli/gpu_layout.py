"""Where the embedded stack's workers and decoders run on a machine with several GPUs, and how many it starts.

Every worker leases its next chunk from the gateway's one queue, so a GPU's share of a job's chunks is its share
of the workers. Workers are therefore spread round robin (worker i on GPU i mod G), and so are the frame
services' replicas (replica r's decoder runs NVDEC on GPU r mod G). Worker i calls replica i mod R; with R a
multiple of G (as the default sizes are) a worker's decoder decodes on the worker's own GPU.

A worker warps on "cuda", CUDA's first device: it is shown only its own GPU through CUDA_VISIBLE_DEVICES, a
setting every CUDA program reads, rather than given an index setting of its own. The decoder takes the index
(SWAPLINE_DECODER_GPU_ID), as CUDA numbers the GPUs the whole stack sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.errors import InvalidArgument

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
DECODER_GPU_ID_ENV = "SWAPLINE_DECODER_GPU_ID"
# Without a GPU: two workers and one process of each frame service, which `make bench` measured on the 2-core
# machine (docs/benchmarks.md): two workers made 5-10% more frames a second than one.
WORKERS_WITHOUT_GPU = 2
FRAME_SERVICE_REPLICAS_WITHOUT_GPU = 1
# On the 16-core H200 machine 8 to 10 workers fed one GPU best, and 16 were slower for one job
# (docs/benchmarks.md, GPU runs 1-7).
WORKERS_PER_GPU = 8
# Two processes of each frame service per GPU: one decoder process topped out near 72 fps, and three or four
# on the 16-core machine were slower than two (runs 5e, 7j, 7k): a replica per 8 cores at most.
FRAME_SERVICE_REPLICAS_PER_GPU = 2
CORES_PER_FRAME_SERVICE_REPLICA = 8


@dataclass(frozen=True)
class GpuLayout:
    """The GPU (as CUDA numbers the stack's visible GPUs) of each worker and each frame-service replica; None:
    no GPU, when the machine has none."""

    gpus: int
    worker_gpus: tuple[int | None, ...]
    frame_service_gpus: tuple[int | None, ...]

    @property
    def workers(self) -> int:
        return len(self.worker_gpus)

    @property
    def frame_service_replicas(self) -> int:
        return len(self.frame_service_gpus)


def describe_layout(layout: GpuLayout) -> str:
    """The sizes chosen, e.g. "16 worker(s) and 4 process(es) of each frame service over 2 GPU(s) (8 and 2 on each)"."""
    sizes = f"{layout.workers} worker(s) and {layout.frame_service_replicas} process(es) of each frame service"
    if layout.gpus == 0:
        return f"{sizes}, no GPU"
    return (
        f"{sizes} over {layout.gpus} GPU(s) "
        f"({_per_gpu(layout.worker_gpus, layout.gpus)} and {_per_gpu(layout.frame_service_gpus, layout.gpus)} on each)"
    )


def _per_gpu(placed: tuple[int | None, ...], gpus: int) -> str:
    """How many of `placed` each GPU has: "8", or "2 to 3" where round robin leaves some GPUs one short."""
    counts = [placed.count(gpu) for gpu in range(gpus)]
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"


def default_workers(gpus: int, cores: int) -> int:
    """WORKERS_PER_GPU on each GPU while the cores last (at least one per GPU); two without a GPU."""
    if gpus == 0:
        return WORKERS_WITHOUT_GPU
    return max(gpus, min(gpus * WORKERS_PER_GPU, cores))


def default_frame_service_replicas(gpus: int, cores: int, workers: int) -> int:
    """FRAME_SERVICE_REPLICAS_PER_GPU on each GPU while the cores last, never more than the workers, and a
    multiple of the GPUs so that each worker's decoder is on its own GPU; one without a GPU."""
    if gpus == 0:
        return FRAME_SERVICE_REPLICAS_WITHOUT_GPU
    wanted = min(gpus * FRAME_SERVICE_REPLICAS_PER_GPU, cores // CORES_PER_FRAME_SERVICE_REPLICA, workers)
    return max(gpus, wanted - wanted % gpus)


def _round_robin(count: int, gpus: int) -> tuple[int | None, ...]:
    return tuple(index % gpus if gpus else None for index in range(count))


def plan_gpu_layout(
    gpus: int, cores: int, workers: int | None = None, frame_service_replicas: int | None = None
) -> GpuLayout:
    """The layout over `gpus` visible GPUs and `cores` cores; a size left None gets its default."""
    if gpus < 0:
        raise InvalidArgument(f"gpus is {gpus}; a machine has 0 or more")
    if cores < 1:
        raise InvalidArgument(f"cores is {cores}; a machine has at least one")
    chosen_workers = default_workers(gpus, cores) if workers is None else workers
    replicas = (
        default_frame_service_replicas(gpus, cores, chosen_workers)
        if frame_service_replicas is None
        else frame_service_replicas
    )
    if chosen_workers < 1 or replicas < 1:
        raise InvalidArgument(f"{chosen_workers} workers and {replicas} frame-service replicas: at least one each")
    return GpuLayout(gpus, _round_robin(chosen_workers, gpus), _round_robin(replicas, gpus))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0))


def visible_device(gpu: int, environment: Mapping[str, str]) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a child only the stack's GPU `gpu`: the stack's own list's entry
    when `environment` (the stack's) narrows the GPUs, else the index."""
    narrowed = environment.get(CUDA_VISIBLE_DEVICES)
    if narrowed is None:
        return str(gpu)
    entries = [entry.strip() for entry in narrowed.split(",")]
    if gpu >= len(entries):
        raise InvalidArgument(f"GPU {gpu} is not among {CUDA_VISIBLE_DEVICES}={narrowed!r}")
    return entries[gpu]


def worker_gpu_env(gpu: int | None, environment: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment for its GPU: only that GPU visible; nothing without a GPU."""
    return {} if gpu is None else {CUDA_VISIBLE_DEVICES: visible_device(gpu, environment)}


def decoder_gpu_env(gpu: int | None) -> dict[str, str]:
    """A decoder replica's environment for its GPU: NVDEC's index; nothing without a GPU."""
    return {} if gpu is None else {DECODER_GPU_ID_ENV: str(gpu)}

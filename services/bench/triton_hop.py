"""One face-swapper request through Triton alone: tensors in the gRPC payload against shared memory.

An 8-face request (target and source crops in FP16, 6 MB in, 4 MB out) is sent `REQUESTS` times to
an embedded tritonserver with each transport; the figures are CPU per request in this process (the
client) and in tritonserver with its backend stubs (from /proc), and wall time per request.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from services.bench.frame_hop import process_cpu_seconds
from services.common.face_geometry import CROP_SIZE
from services.common.triton_client import TritonClient
from services.triton.server_process import EmbeddedTriton
from services.worker.face_swapper import FACE_SWAPPER_MODEL, SWAPPER_OUTPUTS

TritonTransport = Literal["grpc payload", "shared memory"]
TRITON_TRANSPORTS: tuple[TritonTransport, ...] = ("grpc payload", "shared memory")
FACES = 8
REQUESTS = 40
_TIMEOUT_SECONDS = 60.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TritonHopFigures:
    client_cpu_ms: float
    server_cpu_ms: float
    wall_ms: float


def process_tree_cpu_seconds(root: int) -> float:
    """User and system CPU of `root` and its children (tritonserver's backend stubs)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


async def _measure(url: str, server_pid: int, shared_memory: bool) -> TritonHopFigures:
    rng = np.random.default_rng(0)
    shape = (FACES, 3, CROP_SIZE, CROP_SIZE)
    inputs = {"target": rng.random(shape).astype(np.float16), "source": rng.random(shape).astype(np.float16)}
    client = TritonClient(url, _TIMEOUT_SECONDS, shared_memory)
    try:
        for _ in range(3):
            await client.infer(FACE_SWAPPER_MODEL, inputs, SWAPPER_OUTPUTS)
        client_before, server_before = process_cpu_seconds(), process_tree_cpu_seconds(server_pid)
        started = time.perf_counter()
        for _ in range(REQUESTS):
            await client.infer(FACE_SWAPPER_MODEL, inputs, SWAPPER_OUTPUTS)
        wall = time.perf_counter() - started
        client_cpu = process_cpu_seconds() - client_before
        server_cpu = process_tree_cpu_seconds(server_pid) - server_before
    finally:
        await client.close()
    return TritonHopFigures(1000 * client_cpu / REQUESTS, 1000 * server_cpu / REQUESTS, 1000 * wall / REQUESTS)


def measure_triton_hops(
    repository: Path, work_dir: Path, intra_op_threads: int
) -> dict[TritonTransport, TritonHopFigures]:
    with EmbeddedTriton(repository, work_dir, models=[FACE_SWAPPER_MODEL], intra_op_threads=intra_op_threads) as triton:
        if triton.pid is None:
            raise RuntimeError("tritonserver is not running")
        return {
            transport: asyncio.run(_measure(triton.grpc_url, triton.pid, transport == "shared memory"))
            for transport in TRITON_TRANSPORTS
        }

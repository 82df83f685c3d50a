"""One frame hop alone: the demo's frames streamed over loopback gRPC and unpacked, in one process.

Measures CPU (both ends: they share the process) and wall time per frame, with the generated message
classes and with frame_wire's codec over TCP loopback, with frame_wire over a Unix socket, and with the frames
in a shared frame memory and only their file names over a Unix socket (the embedded stack's way), so the cost of
a hop is visible apart from the rest of the job.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from services.common.frames.frame_codec import (
    Frames,
    frame_runs,
    outgoing_runs,
    pack_frames,
    received_frames,
    regroup_frames,
    unpack_frames,
)
from services.common.frames.frame_memory import FrameMemory
from services.common.frames.frame_wire import FrameRun, parse_frame_batch, serialize_frame_batch
from swapline.common.v1 import common_pb2

HopCodec = Literal["generated", "frame_wire", "frame_memory"]
HopTransport = Literal["tcp", "unix"]
# (name, codec, transport) of each measured hop.
HOPS: tuple[tuple[str, HopCodec, HopTransport], ...] = (
    ("generated, tcp", "generated", "tcp"),
    ("frame_wire, tcp", "frame_wire", "tcp"),
    ("frame_wire, unix", "frame_wire", "unix"),
    ("frame memory, unix", "frame_memory", "unix"),
)
# Where the frame memory hop's files go: tmpfs, as the embedded stack's, where the machine has it.
_SHARED_MEMORY = "/dev/shm"
_METHOD = "/swapline.bench.FrameHop/Stream"
_MESSAGE_LIMIT = 64 * 1024 * 1024
_OPTIONS = [("grpc.max_receive_message_length", _MESSAGE_LIMIT), ("grpc.max_send_message_length", _MESSAGE_LIMIT)]


@dataclass(frozen=True)
class HopFigures:
    cpu_ms_per_frame: float
    wall_ms_per_frame: float


def _generated_message(run: FrameRun) -> common_pb2.FrameBatch:
    return pack_frames(run.frames, run.indices)


def _codec(codec: HopCodec) -> tuple[Callable[[FrameRun], Any], Callable[[Any], bytes], Callable[[bytes], Any]]:
    """(what the server yields for a run, its serialiser, the client's deserialiser)."""
    if codec == "generated":
        return _generated_message, common_pb2.FrameBatch.SerializeToString, common_pb2.FrameBatch.FromString
    return (lambda run: run), serialize_frame_batch, parse_frame_batch


async def measure_hop(
    frames: Frames, codec: HopCodec, transport: HopTransport, batch_size: int, repeat: int
) -> HopFigures:
    """The median over `repeat` streams of every frame, received and regrouped as the worker does."""
    parent = _SHARED_MEMORY if os.access(_SHARED_MEMORY, os.W_OK) else None
    with (
        tempfile.TemporaryDirectory(prefix="swapline-hop-") as socket_dir,
        tempfile.TemporaryDirectory(prefix="swapline-hop-frames-", dir=parent) as frame_dir,
    ):
        memory = FrameMemory(Path(frame_dir), 2**40) if codec == "frame_memory" else None
        return await _measure_hop(frames, codec, transport, socket_dir, batch_size, repeat, memory)


def _memory_runs(frames: Frames, batch_size: int, memory: FrameMemory) -> Iterator[Any]:
    """As the decoder sends: a file a decoded batch, each named in one message."""
    for start in range(0, len(frames), batch_size):
        batch = frames[start : start + batch_size]
        runs, _ = outgoing_runs(memory, batch, list(range(start, start + len(batch))))
        yield from runs


async def _measure_hop(
    frames: Frames,
    codec: HopCodec,
    transport: HopTransport,
    socket_dir: str,
    batch_size: int,
    repeat: int,
    memory: FrameMemory | None = None,
) -> HopFigures:
    to_message, serializer, deserializer = _codec(codec)

    async def stream(_request: bytes, _context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if memory is not None:
            for message in _memory_runs(frames, batch_size, memory):
                yield message
            return
        for run in frame_runs(frames, list(range(len(frames)))):
            yield to_message(run)

    server = grpc.aio.server(options=_OPTIONS)
    handler = grpc.unary_stream_rpc_method_handler(stream, request_deserializer=bytes, response_serializer=serializer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("swapline.bench.FrameHop", {"Stream": handler}),)
    )
    if transport == "unix":
        target = f"unix:{socket_dir}/hop.sock"
        server.add_insecure_port(target)
    else:
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    cpu: list[float] = []
    wall: list[float] = []
    try:
        async with grpc.aio.insecure_channel(target, options=_OPTIONS) as channel:
            call = channel.unary_stream(_METHOD, request_serializer=bytes, response_deserializer=deserializer)

            async def received() -> AsyncIterator[tuple[Frames, list[int]]]:
                async for message in call(b""):
                    if memory is not None:
                        batch, indices, _ = received_frames(message, memory)
                    else:
                        batch, indices, _ = unpack_frames(message, copy=False)
                    yield batch, indices

            for _ in range(repeat + 1):
                started_cpu, started = process_cpu_seconds(), time.perf_counter()
                count = 0
                async for batch, _ in regroup_frames(received(), batch_size):
                    count += len(batch)
                cpu.append((process_cpu_seconds() - started_cpu) / count)
                wall.append((time.perf_counter() - started) / count)
    finally:
        await server.stop(None)
    # The first stream warms both ends up.
    return HopFigures(1000 * statistics.median(cpu[1:]), 1000 * statistics.median(wall[1:]))


def process_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def measure_hops(frames: Frames, batch_size: int, repeat: int) -> dict[str, HopFigures]:
    return {
        name: asyncio.run(measure_hop(frames, codec, transport, batch_size, repeat)) for name, codec, transport in HOPS
    }

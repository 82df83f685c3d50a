from __future__ import annotations

import asyncio
import os
import time
from itertools import pairwise

from tritonclient.utils import InferenceServerException

from services.common.triton_shared_memory import (
    ALIGNMENT,
    MIN_REGION_BYTES,
    Placement,
    PoolLimits,
    SharedMemoryPool,
    SharedMemoryRegion,
    aligned,
    plan_layout,
    region_size,
)


def test_sizes_round_up_to_the_alignment() -> None:
    assert [aligned(size) for size in (0, 1, ALIGNMENT, ALIGNMENT + 1)] == [0, ALIGNMENT, ALIGNMENT, 2 * ALIGNMENT]


def test_inputs_come_first_then_one_capacity_per_output() -> None:
    layout = plan_layout({"target": 100, "source": 64}, ["swapped", "mask"], output_capacity=100)
    assert layout.inputs == [Placement("target", 0, 100), Placement("source", 128, 64)]
    assert layout.outputs == [Placement("swapped", 192, 100), Placement("mask", 320, 100)]
    assert layout.byte_size == 448


def test_every_placement_starts_aligned_and_none_overlap() -> None:
    layout = plan_layout({"a": 3, "b": 70, "c": 1}, ["x", "y"], output_capacity=65)
    placements = sorted(layout.inputs + layout.outputs, key=lambda placement: placement.offset)
    assert all(placement.offset % ALIGNMENT == 0 for placement in placements)
    assert all(left.offset + left.byte_size <= right.offset for left, right in pairwise(placements))
    assert placements[-1].offset + placements[-1].byte_size <= layout.byte_size


def test_regions_are_sized_to_powers_of_two_from_one_mebibyte() -> None:
    assert [region_size(size) for size in (1, MIN_REGION_BYTES, MIN_REGION_BYTES + 1, 5 << 20)] == [
        MIN_REGION_BYTES,
        MIN_REGION_BYTES,
        2 * MIN_REGION_BYTES,
        8 << 20,
    ]


class _FakeTriton:
    """The shared-memory calls of Triton's aio client, as the server answers them.

    Each call yields to the event loop, as its network round trip does. Unregistering succeeds for a
    name Triton does not know, and fails for a region a request still references (`held`).
    """

    def __init__(self) -> None:
        self.registered: set[str] = set()
        self.held: set[str] = set()

    async def register_system_shared_memory(
        self, name: str, key: str, byte_size: int, client_timeout: float | None = None
    ) -> None:
        await asyncio.sleep(0)
        self.registered.add(name)

    async def unregister_system_shared_memory(self, name: str, client_timeout: float | None = None) -> None:
        await asyncio.sleep(0)
        if name in self.held:
            raise InferenceServerException(f"Cannot unregister shared memory region '{name}', it is in use")
        self.registered.discard(name)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pool(triton: _FakeTriton, limits: PoolLimits | None = None, clock: _Clock | None = None) -> SharedMemoryPool:
    return SharedMemoryPool(triton, 1.0, limits, clock or _Clock())


def _in_dev_shm(regions: list[SharedMemoryRegion]) -> list[str]:
    return [region.name for region in regions if os.path.exists(f"/dev/shm/{region.name}")]


def test_concurrent_acquires_remove_each_abandoned_region_once() -> None:
    triton = _FakeTriton()

    async def scenario() -> tuple[list[SharedMemoryRegion], list[SharedMemoryRegion]]:
        pool = _pool(triton)
        try:
            abandoned = [await pool.acquire(MIN_REGION_BYTES) for _ in range(3)]
            for region in abandoned:
                pool.abandon(region)
            # Both find no free region and sweep the abandoned ones while the other's unregister call
            # is in flight: the race that raised ValueError and failed a fresh job as INTERNAL.
            fresh = await asyncio.gather(*(pool.acquire(MIN_REGION_BYTES) for _ in range(2)))
            return abandoned, fresh
        finally:
            await pool.close()

    abandoned, fresh = asyncio.run(scenario())
    assert len({region.name for region in fresh}) == 2
    assert not {region.name for region in fresh} & {region.name for region in abandoned}
    assert _in_dev_shm(abandoned) == []


def test_a_region_triton_still_holds_is_removed_once_it_lets_go() -> None:
    triton = _FakeTriton()

    async def scenario() -> tuple[list[str], list[str], int]:
        pool = _pool(triton)
        try:
            region = await pool.acquire(MIN_REGION_BYTES)
            triton.held.add(region.name)
            pool.abandon(region)
            await asyncio.gather(pool.sweep(), pool.sweep())
            while_held = _in_dev_shm([region])
            triton.held.clear()
            await pool.sweep()
            return while_held, _in_dev_shm([region]), pool.region_count
        finally:
            await pool.close()

    while_held, after, count = asyncio.run(scenario())
    assert len(while_held) == 1
    assert after == [] and count == 0


def test_a_free_region_idle_past_the_limit_is_unregistered_and_unlinked() -> None:
    triton = _FakeTriton()
    clock = _Clock()

    async def scenario() -> tuple[list[str], list[str], SharedMemoryRegion, SharedMemoryRegion]:
        pool = _pool(triton, PoolLimits(idle_seconds=10.0), clock)
        try:
            old, recent = await pool.acquire(MIN_REGION_BYTES), await pool.acquire(MIN_REGION_BYTES)
            pool.release(old)
            clock.now += 6
            pool.release(recent)
            await pool.sweep()
            before_limit = _in_dev_shm([old, recent])
            clock.now += 5
            await pool.sweep()
            return before_limit, _in_dev_shm([old, recent]), old, recent
        finally:
            await pool.close()

    before_limit, after_limit, old, recent = asyncio.run(scenario())
    assert before_limit == [old.name, recent.name]
    assert after_limit == [recent.name]
    assert old.name not in triton.registered and recent.name not in triton.registered


def test_free_regions_beyond_the_caps_go_least_recently_used_first() -> None:
    triton = _FakeTriton()
    clock = _Clock()

    async def scenario(limits: PoolLimits) -> tuple[list[SharedMemoryRegion], list[str], int]:
        pool = _pool(triton, limits, clock)
        try:
            regions = [await pool.acquire(MIN_REGION_BYTES) for _ in range(4)]
            for region in regions:
                clock.now += 1
                pool.release(region)
            await pool.sweep()
            return regions, _in_dev_shm(regions), pool.byte_size
        finally:
            await pool.close()

    regions, left, _ = asyncio.run(scenario(PoolLimits(max_regions=2)))
    assert left == [region.name for region in regions[2:]]
    regions, left, byte_size = asyncio.run(scenario(PoolLimits(max_bytes=3 * MIN_REGION_BYTES)))
    assert left == [region.name for region in regions[1:]]
    assert byte_size == 3 * MIN_REGION_BYTES


def test_regions_in_use_are_never_taken_to_meet_the_caps() -> None:
    triton = _FakeTriton()

    async def scenario() -> tuple[list[str], SharedMemoryRegion]:
        pool = _pool(triton, PoolLimits(max_regions=1))
        try:
            in_use = [await pool.acquire(MIN_REGION_BYTES) for _ in range(3)]
            await pool.sweep()
            held = _in_dev_shm(in_use)
            pool.release(in_use[0])
            again = await pool.acquire(MIN_REGION_BYTES)
            return held, again
        finally:
            await pool.close()

    held, again = asyncio.run(scenario())
    assert len(held) == 3
    # Over the cap, the released region was retired rather than handed out again.
    assert again.name not in held


def test_the_background_sweep_removes_idle_regions_without_further_requests() -> None:
    triton = _FakeTriton()

    async def scenario() -> tuple[list[str], list[str]]:
        pool = SharedMemoryPool(triton, 1.0, PoolLimits(idle_seconds=0.05))
        try:
            region = await pool.acquire(MIN_REGION_BYTES)
            pool.release(region)
            just_released = _in_dev_shm([region])
            deadline = time.monotonic() + 5
            while _in_dev_shm([region]) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return just_released, _in_dev_shm([region])
        finally:
            await pool.close()

    just_released, later = asyncio.run(scenario())
    assert len(just_released) == 1 and later == []


def test_a_sweep_cancelled_part_way_leaves_its_regions_to_the_next_one() -> None:
    triton = _FakeTriton()

    async def scenario() -> tuple[list[SharedMemoryRegion], list[str]]:
        pool = _pool(triton)
        try:
            abandoned = [await pool.acquire(MIN_REGION_BYTES) for _ in range(3)]
            for region in abandoned:
                pool.abandon(region)
            asked = asyncio.Event()
            unregister = triton.unregister_system_shared_memory

            async def slow_unregister(name: str, client_timeout: float | None = None) -> None:
                asked.set()
                await asyncio.Event().wait()

            triton.unregister_system_shared_memory = slow_unregister  # type: ignore[method-assign]
            # The request that would have swept is cancelled while Triton has not answered.
            request = asyncio.create_task(pool.acquire(MIN_REGION_BYTES))
            await asked.wait()
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            triton.unregister_system_shared_memory = unregister  # type: ignore[method-assign]
            await pool.sweep()
            return abandoned, _in_dev_shm(abandoned)
        finally:
            await pool.close()

    abandoned, left = asyncio.run(scenario())
    assert len(abandoned) == 3 and left == []

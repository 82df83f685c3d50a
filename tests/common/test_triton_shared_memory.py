from __future__ import annotations

from itertools import pairwise

from services.common.triton_shared_memory import (
    ALIGNMENT,
    MIN_REGION_BYTES,
    Placement,
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
        MIN_REGION_BYTES, MIN_REGION_BYTES, 2 * MIN_REGION_BYTES, 8 << 20
    ]

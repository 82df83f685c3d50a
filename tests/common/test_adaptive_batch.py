from __future__ import annotations

import asyncio

import pytest

from services.common.adaptive_batch import AdaptiveBatch
from services.common.errors import InvalidArgument, ResourceExhausted


class _Model:
    """Answers a slice with its items; runs out of memory above `memory` items."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.sizes: list[int] = []

    async def __call__(self, part: slice) -> list[int]:
        self.sizes.append(part.stop - part.start)
        if part.stop - part.start > self.memory:
            raise ResourceExhausted("out of memory")
        return list(range(part.start, part.stop))


def _run(batch: AdaptiveBatch, count: int, model: _Model, most: int | None = None) -> list[int]:
    return [item for part in asyncio.run(batch.run(count, model, most)) for item in part]


def test_requests_cover_every_item_in_order_up_to_the_limit() -> None:
    model = _Model(memory=100)
    assert _run(AdaptiveBatch("m", 4), 10, model) == list(range(10)) and model.sizes == [4, 4, 2]


def test_the_transport_cap_bounds_a_request_below_the_limit() -> None:
    model = _Model(memory=100)
    assert _run(AdaptiveBatch("m", 8), 5, model, most=2) == list(range(5)) and model.sizes == [2, 2, 1]


def test_out_of_memory_halves_and_the_smaller_limit_is_kept() -> None:
    model, batch = _Model(memory=3), AdaptiveBatch("m", 16)
    assert _run(batch, 10, model) == list(range(10))
    assert model.sizes == [10, 5, 2, 2, 2, 2, 2] and batch.limit == 2
    assert _run(batch, 3, model) == [0, 1, 2] and model.sizes[-2:] == [2, 1]


def test_out_of_memory_at_one_item_is_passed_on() -> None:
    model = _Model(memory=0)
    with pytest.raises(ResourceExhausted):
        _run(AdaptiveBatch("m", 4), 4, model)
    assert model.sizes == [4, 2, 1]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="model m: a batch limit must be at least 1"):
        AdaptiveBatch("m", 0)

"""Runs a blocking iterator in worker threads, one step at a time, for an asyncio caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator
from typing import TypeVar

ItemT = TypeVar("ItemT")

_EXHAUSTED = object()


async def stream_in_thread(generator: Generator[ItemT, None, None]) -> AsyncGenerator[ItemT, None]:
    """Yields the generator's items while the event loop keeps serving other calls.

    If the caller stops early (a cancelled RPC), the step in flight is allowed to finish before
    the generator is closed in a thread, so its resources (an open container) are released and
    it is never resumed from two threads at once.
    """
    loop = asyncio.get_running_loop()
    step: asyncio.Future[object] | None = None
    try:
        while True:
            step = loop.run_in_executor(None, next, generator, _EXHAUSTED)
            item = await asyncio.shield(step)
            step = None
            if item is _EXHAUSTED:
                return
            yield item  # type: ignore[misc]
    finally:
        if step is not None:
            await asyncio.wait([step])
        await loop.run_in_executor(None, generator.close)

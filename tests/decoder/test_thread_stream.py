from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator

from services.decoder.thread_stream import stream_in_thread


def test_items_come_from_a_worker_thread_in_order() -> None:
    threads: list[int] = []

    def numbers() -> Generator[int, None, None]:
        for number in range(5):
            threads.append(threading.get_ident())
            yield number

    async def collect() -> list[int]:
        return [item async for item in stream_in_thread(numbers())]

    assert asyncio.run(collect()) == [0, 1, 2, 3, 4]
    assert threading.get_ident() not in threads


def test_stopping_early_closes_the_generator() -> None:
    closed = threading.Event()

    def endless() -> Generator[int, None, None]:
        try:
            number = 0
            while True:
                yield number
                number += 1
        finally:
            closed.set()

    async def take_two() -> list[int]:
        taken: list[int] = []
        stream = stream_in_thread(endless())
        async for item in stream:
            taken.append(item)
            if len(taken) == 2:
                break
        await stream.aclose()
        return taken

    assert asyncio.run(take_two()) == [0, 1]
    assert closed.is_set()

"""Requests to one model in batches that shrink when the model runs out of memory.

An out-of-memory answer (ResourceExhausted) halves the items per request and retries, down to one item
before the error is passed on; the smaller size is kept for the caller's later batches, because the memory
that ran out is usually still taken. Every model a worker or the detector calls goes through this.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.common.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

AnswerT = TypeVar("AnswerT")


class AdaptiveBatch:
    """The most items one request to `model` carries, starting at `limit`."""

    def __init__(self, model: str, limit: int) -> None:
        if limit < 1:
            raise InvalidArgument(f"model {model}: a batch limit must be at least 1, got {limit}")
        self.model = model
        self.limit = limit

    async def run(
        self, count: int, request: Callable[[slice], Awaitable[AnswerT]], most: int | None = None
    ) -> list[AnswerT]:
        """The answers of `request` for consecutive slices covering range(count), in order; no slice is longer
        than `most` (a transport's cap, such as bytes per request) or the limit."""
        answers: list[AnswerT] = []
        start = 0
        while start < count:
            size = self.limit if most is None else max(1, min(self.limit, most))
            part = slice(start, min(count, start + size))
            try:
                answers.append(await request(part))
            except ResourceExhausted:
                if self.limit == 1:
                    raise
                self.limit = max(1, min(self.limit, part.stop - part.start) // 2)
                log.warning("model %s ran out of memory; retrying with %d items per request", self.model, self.limit)
                continue
            start = part.stop
        return answers

"""Wakes the watchers of a job when it changes, instead of having them poll the store.

A watcher registers before it reads the job, so a change that lands between its read and its wait
still wakes it. Only watched jobs are tracked: the feed holds nothing for the jobs nobody watches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class JobWatch:
    """One watcher's view of one job: whether it changed since the watcher last looked."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def mark_changed(self) -> None:
        self._changed.set()

    async def changed_within(self, seconds: float) -> bool:
        """Waits at most `seconds` for a change since the last call; True if one came.

        The mark is cleared before returning, so the caller's next read of the store sees this change
        and any later one marks the watch again.
        """
        try:
            await asyncio.wait_for(self._changed.wait(), max(seconds, 0.0))
        except TimeoutError:
            return False
        self._changed.clear()
        return True


class JobChangeFeed:
    def __init__(self) -> None:
        self._watches: dict[str, set[JobWatch]] = {}

    async def notify(self, job_id: str) -> None:
        """The job changed, through this gateway or (heard through the store) another one."""
        for watch in self._watches.get(job_id, ()):
            watch.mark_changed()

    @contextmanager
    def watching(self, *job_ids: str) -> Iterator[JobWatch]:
        """One watch marked by a change of any of the jobs (a batch's, say)."""
        watch = JobWatch()
        for job_id in job_ids:
            self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            for job_id in job_ids:
                watchers = self._watches[job_id]
                watchers.discard(watch)
                if not watchers:
                    del self._watches[job_id]

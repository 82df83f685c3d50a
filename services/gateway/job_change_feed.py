"""In-memory per-job change versions that watchers wait on, instead of polling the store."""

from __future__ import annotations

import asyncio


class JobChangeFeed:
    """Each change to a job bumps its version; a watcher waits until the version passes the one it saw."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._changed = asyncio.Condition()

    def version(self, job_id: str) -> int:
        return self._versions.get(job_id, 0)

    async def notify(self, job_id: str) -> None:
        async with self._changed:
            self._versions[job_id] = self.version(job_id) + 1
            self._changed.notify_all()

    async def wait_past(self, job_id: str, seen: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version(job_id) > seen)
            return self.version(job_id)

"""Follows a job, or a batch, to its end across gateway restarts and dropped connections.

A watch that fails with UNAVAILABLE (the gateway restarting, a connection dropped) is opened again
with backoff; only an outage longer than the reconnect budget ends the follow with that error.
The gateway keeps the job's state in its store, so the reopened watch carries on where it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from services.cli.job_client import BATCH_TERMINAL_STATES, TERMINAL_STATES
from services.common.errors import Unavailable
from swapline.jobs.v1 import jobs_pb2

ResultT = TypeVar("ResultT")
EventT = TypeVar("EventT")

# Longer than a supervised gateway takes to come back, and than the stack's longest tested outage.
RECONNECT_BUDGET_SECONDS = 120.0
FIRST_RETRY_SECONDS = 0.25
MAX_RETRY_SECONDS = 5.0


class WatchingClient(Protocol):
    def watch(self, job_id: str) -> Iterator[jobs_pb2.JobEvent]: ...

    def get(self, job_id: str) -> jobs_pb2.Job: ...


class BatchWatchingClient(Protocol):
    def watch_batch(self, batch_id: str) -> Iterator[jobs_pb2.BatchEvent]: ...

    def get_batch(self, batch_id: str) -> jobs_pb2.Batch: ...


@dataclass(frozen=True)
class Reconnecting:
    """Told to the caller before each wait: what failed, how long until the next try, and the outage so far."""

    error: Unavailable
    retry_in_seconds: float
    outage_seconds: float


class Reconnector:
    """Backoff over one outage at a time: the budget counts from the first failure since the last success."""

    def __init__(
        self,
        on_retry: Callable[[Reconnecting], None],
        budget_seconds: float = RECONNECT_BUDGET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._on_retry = on_retry
        self._budget = budget_seconds
        self._clock = clock
        self._sleep = sleep
        self._outage_started: float | None = None
        self._delay = FIRST_RETRY_SECONDS

    def succeeded(self) -> None:
        self._outage_started = None
        self._delay = FIRST_RETRY_SECONDS

    def failed(self, error: Unavailable) -> None:
        """Waits before the next try; raises `error` once the outage has lasted the whole budget."""
        now = self._clock()
        if self._outage_started is None:
            self._outage_started = now
        outage = now - self._outage_started
        if outage >= self._budget:
            raise error
        delay = min(self._delay, self._budget - outage)
        self._on_retry(Reconnecting(error, delay, outage))
        self._sleep(delay)
        self._delay = min(self._delay * 2, MAX_RETRY_SECONDS)

    def call(self, operation: Callable[[], ResultT]) -> ResultT:
        while True:
            try:
                result = operation()
            except Unavailable as error:
                self.failed(error)
                continue
            self.succeeded()
            return result


def follow_events(
    open_watch: Callable[[], Iterable[EventT]],
    is_final: Callable[[EventT], bool],
    read_final: Callable[[], ResultT],
    on_event: Callable[[EventT], None],
    reconnector: Reconnector,
    what: str,
) -> ResultT:
    """Passes every event to `on_event` until one is final, then returns `read_final()`.

    UNAVAILABLE from the watch, from `on_event` or from `read_final` is an outage: waited out, then the
    watch is opened again.
    """
    while True:
        try:
            for event in open_watch():
                reconnector.succeeded()
                on_event(event)
                if is_final(event):
                    return reconnector.call(read_final)
        except Unavailable as error:
            reconnector.failed(error)
            continue
        # The stream ended without a final state: the gateway closed it while stopping.
        reconnector.failed(Unavailable(f"the watch of {what} ended before it did"))


def follow_job(
    client: WatchingClient,
    job_id: str,
    on_event: Callable[[jobs_pb2.JobEvent], None],
    reconnector: Reconnector,
) -> jobs_pb2.Job:
    """Passes every event to `on_event` until the job ends, then returns the finished job."""
    return follow_events(
        lambda: client.watch(job_id),
        lambda event: event.state in TERMINAL_STATES,
        lambda: client.get(job_id),
        on_event,
        reconnector,
        f"job {job_id[:40]}",
    )


def follow_batch(
    client: BatchWatchingClient,
    batch_id: str,
    on_event: Callable[[jobs_pb2.BatchEvent], None],
    reconnector: Reconnector,
) -> jobs_pb2.Batch:
    """Passes every aggregate event to `on_event` until every job of the batch has ended; returns the batch."""
    return follow_events(
        lambda: client.watch_batch(batch_id),
        lambda event: event.state in BATCH_TERMINAL_STATES,
        lambda: client.get_batch(batch_id),
        on_event,
        reconnector,
        f"batch {batch_id[:40]}",
    )

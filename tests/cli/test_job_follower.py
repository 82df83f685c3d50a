from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.cli import commands
from services.cli.job_follower import (
    FIRST_RETRY_SECONDS,
    MAX_RETRY_SECONDS,
    Reconnecting,
    Reconnector,
    follow_job,
)
from services.common.errors import NotFound, Unavailable
from swapline.jobs.v1 import jobs_pb2

RUNNING = jobs_pb2.JOB_STATE_RUNNING
SUCCEEDED = jobs_pb2.JOB_STATE_SUCCEEDED


def event(state: jobs_pb2.JobState, frames_done: int) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(job_id="job-1", state=state, frames_done=frames_done, frames_total=100)


class GatewayThatRestarts:
    """Each watch plays one script: events, then either an UNAVAILABLE, the end of the stream, or nothing."""

    def __init__(self, scripts: list[tuple[list[jobs_pb2.JobEvent], BaseException | None]], get_failures: int = 0):
        self._scripts = scripts
        self._get_failures = get_failures
        self.watches = 0

    def watch(self, job_id: str) -> Iterator[jobs_pb2.JobEvent]:
        events, ending = self._scripts[self.watches]
        self.watches += 1
        yield from events
        if ending is not None:
            raise ending

    def get(self, job_id: str) -> jobs_pb2.Job:
        if self._get_failures:
            self._get_failures -= 1
            raise Unavailable("connection refused")
        return jobs_pb2.Job(id=job_id, state=SUCCEEDED, frames_done=100, frames_total=100)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def reconnector(clock: FakeClock, budget: float = 120.0) -> tuple[Reconnector, list[Reconnecting]]:
    told: list[Reconnecting] = []
    return Reconnector(told.append, budget_seconds=budget, clock=clock, sleep=clock.sleep), told


def test_the_cli_watch_carries_on_across_a_gateway_restart(capsys: pytest.CaptureFixture[str]) -> None:
    gateway = GatewayThatRestarts(
        [
            ([event(RUNNING, 10)], Unavailable("Socket closed")),
            ([], Unavailable("failed to connect to all addresses")),
            ([event(RUNNING, 60), event(SUCCEEDED, 100)], None),
        ]
    )
    job = commands.follow(gateway, "job-1")
    assert job.state == SUCCEEDED
    assert gateway.watches == 3
    progress = capsys.readouterr().err
    assert "10/100 frames" in progress and "100/100 frames" in progress
    assert "reconnecting" in progress


def test_the_outage_budget_counts_from_the_first_failure_and_backs_off() -> None:
    clock = FakeClock()
    retry, told = reconnector(clock, budget=10.0)
    failure = Unavailable("down")
    with pytest.raises(Unavailable) as gave_up:
        while True:
            retry.failed(failure)
    assert gave_up.value is failure
    assert clock.now == pytest.approx(10.0)
    assert clock.sleeps[:3] == [FIRST_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2, FIRST_RETRY_SECONDS * 4]
    assert max(clock.sleeps) <= MAX_RETRY_SECONDS
    assert [each.outage_seconds for each in told][:2] == [0.0, FIRST_RETRY_SECONDS]


def test_an_answer_between_outages_restores_the_whole_budget() -> None:
    clock = FakeClock()
    retry, _ = reconnector(clock, budget=10.0)
    for _ in range(3):
        retry.failed(Unavailable("down"))
    clock.now += 9.0
    retry.succeeded()
    retry.failed(Unavailable("down again"))
    assert clock.sleeps[-1] == FIRST_RETRY_SECONDS


def test_an_outage_longer_than_the_budget_ends_the_follow_with_unavailable() -> None:
    clock = FakeClock()
    gateway = GatewayThatRestarts([([event(RUNNING, 10)], None)] + [([], Unavailable("refused"))] * 100)
    retry, _ = reconnector(clock, budget=30.0)
    with pytest.raises(Unavailable):
        follow_job(gateway, "job-1", lambda _: None, retry)
    assert clock.now == pytest.approx(30.0)


def test_a_stream_that_ends_before_the_job_is_reopened() -> None:
    clock = FakeClock()
    seen: list[int] = []
    gateway = GatewayThatRestarts([([event(RUNNING, 10)], None), ([event(SUCCEEDED, 100)], None)])
    job = follow_job(gateway, "job-1", lambda each: seen.append(each.frames_done), reconnector(clock)[0])
    assert job.state == SUCCEEDED and seen == [10, 100]


def test_the_final_get_is_retried_too() -> None:
    clock = FakeClock()
    gateway = GatewayThatRestarts([([event(SUCCEEDED, 100)], None)], get_failures=2)
    job = follow_job(gateway, "job-1", lambda _: None, reconnector(clock)[0])
    assert job.state == SUCCEEDED and len(clock.sleeps) == 2


def test_other_errors_are_not_retried() -> None:
    clock = FakeClock()
    gateway = GatewayThatRestarts([([], NotFound("no job"))])
    with pytest.raises(NotFound):
        follow_job(gateway, "job-1", lambda _: None, reconnector(clock)[0])
    assert clock.sleeps == []

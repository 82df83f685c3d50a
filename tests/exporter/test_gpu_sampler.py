from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.common.gpu_telemetry import GpuProcess, GpuSample, GpuUnavailable
from services.common.gpu_trend_log import TrendLog
from services.exporter.gpu_recording import RecordedReader
from services.exporter.gpu_sampler import BACKOFF_MAX_SECONDS, GpuSampler, next_backoff, next_due
from tests.exporter.telemetry_fixtures import FakeClock, gpu_sample, outage, record, sweep


class ScriptedWait:
    """Stands in for Event.wait: records each delay, moves the fake clock, stops after `stops_after` waits."""

    def __init__(self, clock: FakeClock, stops_after: int) -> None:
        self.clock = clock
        self.stops_after = stops_after
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> bool:
        self.delays.append(seconds)
        self.clock.advance(seconds)
        return len(self.delays) >= self.stops_after


class SlowReader:
    """Each sweep takes `sweep_seconds` of fake time."""

    def __init__(self, clock: FakeClock, sweep_seconds: list[float]) -> None:
        self.clock = clock
        self.durations = list(sweep_seconds)

    def sample_all(self) -> list[GpuSample]:
        self.clock.advance(self.durations.pop(0) if self.durations else 0.0)
        return [gpu_sample(0)]

    def processes(self) -> list[GpuProcess]:
        return []

    def xid_events(self) -> list[tuple[int, int]]:
        return []

    def close(self) -> None:
        return None


def test_backoff_doubles_from_one_second_and_caps_at_thirty() -> None:
    delays = []
    delay = None
    for _ in range(8):
        delay = next_backoff(delay)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert BACKOFF_MAX_SECONDS == 30.0


def test_next_due_keeps_a_fixed_grid_and_skips_missed_ticks() -> None:
    assert next_due(10.0, 10.3, 1.0) == 11.0
    assert next_due(10.0, 12.5, 1.0) == 13.0
    assert next_due(10.0, 12.0, 1.0) == 13.0


def test_loop_waits_the_rest_of_the_interval_so_the_schedule_does_not_drift() -> None:
    clock = FakeClock(0.0)
    sampler = GpuSampler(SlowReader(clock, [0.25, 0.5, 0.1, 2.3, 0.0]), node="n", clock=clock)
    wait = ScriptedWait(clock, stops_after=5)

    sampler.run(wait)

    # Sweeps start at 0, 1, 2, 3 (runs to 5.3, missing ticks 4 and 5), then 6.
    assert wait.delays == pytest.approx([0.75, 0.5, 0.9, 0.7, 1.0])
    assert sampler.snapshot.sweeps_total == 5


def test_no_gpu_exports_down_with_reason_logs_once_backs_off_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reason = "nvmlInit failed: Driver Not Loaded"
    path = record(tmp_path / "rec.jsonl", [*(outage(reason) for _ in range(7)), sweep([gpu_sample(0)])])
    clock = FakeClock(0.0)
    sampler = GpuSampler(RecordedReader(path, cycle=False), node="n", clock=clock)
    wait = ScriptedWait(clock, stops_after=8)
    snapshots = []

    def wait_and_look(seconds: float) -> bool:
        snapshots.append(sampler.snapshot)
        return wait(seconds)

    with caplog.at_level(logging.INFO, logger="services.exporter.gpu_sampler"):
        sampler.run(wait_and_look)

    assert [snapshot.nvml_up for snapshot in snapshots] == [False] * 7 + [True]
    assert snapshots[0].reason == reason
    assert snapshots[0].samples == ()
    assert snapshots[-1].reason == ""
    assert len(snapshots[-1].samples) == 1
    assert snapshots[-1].nvml_errors_total == 7
    assert wait.delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 1.0]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert reason in warnings[0].getMessage()
    assert any("readable again" in record.getMessage() for record in caplog.records)
    assert sampler.backoff_seconds is None


def test_a_new_reason_is_logged_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = record(tmp_path / "rec.jsonl", [outage("first"), outage("first"), outage("second"), outage("second")])
    sampler = GpuSampler(RecordedReader(path), node="n", clock=FakeClock())

    with caplog.at_level(logging.WARNING, logger="services.exporter.gpu_sampler"):
        for _ in range(4):
            assert sampler.sweep() is False

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "first" in messages[0]
    assert "second" in messages[1]
    assert sampler.snapshot.reason == "second"


def test_an_unexpected_reader_error_is_an_outage_not_a_crash() -> None:
    class BrokenReader(SlowReader):
        def sample_all(self) -> list[GpuSample]:
            raise RuntimeError("ctypes went sideways")

    clock = FakeClock()
    sampler = GpuSampler(BrokenReader(clock, []), node="n", clock=clock)
    wait = ScriptedWait(clock, stops_after=3)

    sampler.run(wait)

    assert sampler.snapshot.nvml_up is False
    assert sampler.snapshot.reason == "RuntimeError: ctypes went sideways"
    assert wait.delays == [1.0, 2.0, 4.0]


def test_a_failing_trend_log_does_not_stop_the_metrics(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = record(tmp_path / "rec.jsonl", [sweep([gpu_sample(0)])])
    sampler = GpuSampler(RecordedReader(path), node="n", trend_log=TrendLog(blocker / "trend", "n"), clock=FakeClock())

    assert sampler.sweep() is True
    assert sampler.snapshot.nvml_up is True


def test_xid_events_accumulate_per_gpu_and_code(tmp_path: Path) -> None:
    path = record(
        tmp_path / "rec.jsonl",
        [sweep([gpu_sample(0)], xid=[(0, 79)]), sweep([gpu_sample(0)], xid=[(0, 79), (0, 48)]), outage("x")],
    )
    sampler = GpuSampler(RecordedReader(path), node="n", clock=FakeClock())
    for _ in range(3):
        sampler.sweep()

    assert dict(sampler.snapshot.xid_counts) == {(0, 48): 1, (0, 79): 2}


def test_healthz_state_follows_the_loop() -> None:
    clock = FakeClock()
    sampler = GpuSampler(SlowReader(clock, []), node="n", clock=clock)
    seen_alive = []

    def wait(seconds: float) -> bool:
        seen_alive.append(sampler.loop_alive())
        return True

    assert sampler.loop_alive() is False
    sampler.run(wait)
    assert seen_alive == [True]
    assert sampler.loop_alive() is False


def test_sweep_reads_nothing_after_a_reader_reports_unavailable_in_processes(tmp_path: Path) -> None:
    class ProcessesFail(SlowReader):
        def processes(self) -> list[GpuProcess]:
            raise GpuUnavailable("GPU is lost")

    sampler = GpuSampler(ProcessesFail(FakeClock(), []), node="n", clock=FakeClock())

    assert sampler.sweep() is False
    assert sampler.snapshot.samples == ()
    assert sampler.snapshot.reason == "GPU is lost"

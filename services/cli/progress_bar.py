"""One-line progress for a watched job (bar, frames, fps, stage, ETA), or for a batch (bar, jobs, frames, fps, ETA)."""

from __future__ import annotations

import sys
from typing import TextIO

from services.cli.job_client import state_name
from swapline.jobs.v1 import jobs_pb2

BAR_WIDTH = 30


def format_eta(seconds: float) -> str:
    if seconds < 0:
        return "--"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def format_gpu(event: jobs_pb2.JobEvent) -> str:
    """The ", GPU 78%" part while the gateway knows the utilisation; it sends a negative value when not."""
    return f", GPU {event.gpu_utilization_percent:.0f}%" if event.gpu_utilization_percent >= 0 else ""


def frame_fraction(frames_done: int, frames_total: int) -> float:
    return min(frames_done / frames_total, 1.0) if frames_total > 0 else 0.0


def bar_text(fraction: float) -> str:
    filled = round(fraction * BAR_WIDTH)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def progress_line(event: jobs_pb2.JobEvent) -> str:
    total = max(event.frames_total, 0)
    fraction = frame_fraction(event.frames_done, total)
    stage = f" {event.stage}" if event.stage else ""
    return (
        f"{bar_text(fraction)} {fraction:6.1%} {event.frames_done}/{total} frames"
        f" {event.fps:5.1f} fps, chunks {event.chunks_done}/{event.chunks_total},"
        f" {state_name(event.state)}{stage}{format_gpu(event)}, ETA {format_eta(event.eta_seconds)}"
    )


def batch_progress_line(event: jobs_pb2.BatchEvent) -> str:
    """Frames over the whole batch, then its jobs: ended of all, with the failed and skipped ones named."""
    counts = event.counts
    total = max(event.frames_total, 0)
    fraction = frame_fraction(event.frames_done, total)
    ended = counts.succeeded + counts.failed + counts.cancelled
    outcomes = [
        f"{count} {name}"
        for count, name in ((counts.failed, "failed"), (counts.cancelled, "cancelled"), (counts.skipped, "skipped"))
        if count
    ]
    return (
        f"{bar_text(fraction)} {fraction:6.1%} jobs {ended}/{counts.jobs_total} done"
        f"{' (' + ', '.join(outcomes) + ')' if outcomes else ''}, {counts.running} running,"
        f" {event.frames_done}/{total} frames {event.fps:5.1f} fps, ETA {format_eta(event.eta_seconds)}"
    )


class ProgressBar:
    """Redraws in place on a terminal; prints one line per change in percent elsewhere (logs, CI)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # sys.stderr as it is now, not at import: a test or a caller may have replaced it since.
        self._stream = stream if stream is not None else sys.stderr
        self._interactive = self._stream.isatty()
        self._last_percent = -1

    def update(self, event: jobs_pb2.JobEvent) -> None:
        fraction = frame_fraction(event.frames_done, event.frames_total)
        self.show(progress_line(event), fraction, event.state == jobs_pb2.JOB_STATE_RUNNING)

    def update_batch(self, event: jobs_pb2.BatchEvent) -> None:
        fraction = frame_fraction(event.frames_done, event.frames_total)
        self.show(batch_progress_line(event), fraction, event.state == jobs_pb2.BATCH_STATE_RUNNING)

    def show(self, line: str, fraction: float, running: bool) -> None:
        """Redraws `line`; off a terminal, prints it when the tenth of `fraction` changes or no longer running."""
        if self._interactive:
            self._stream.write("\r" + line.ljust(110))
        else:
            percent = int(100 * fraction)
            if percent // 10 == self._last_percent // 10 and running:
                return
            self._last_percent = percent
            self._stream.write(line + "\n")
        self._stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (a reconnect, say); on a terminal the bar is redrawn below it at the next update."""
        self._stream.write(("\r" + message.ljust(110) if self._interactive else message) + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._interactive:
            self._stream.write("\n")
            self._stream.flush()

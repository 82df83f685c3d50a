"""Ends the embedded stack's children when the process that started them dies without stopping them.

The children run in sessions of their own, so that a Ctrl-C at the terminal reaches only the CLI, which
stops them in order. A CLI killed outright (SIGKILL, the OOM killer) would leave them running: the gateway
holding its port and its database, the workers leasing chunks, tritonserver holding its models, so that the
next `swapline batch` would start a second stack on the same store. The supervisor therefore starts this
small process (stdlib only, in a session of its own too) with a pipe on its stdin, and writes to it the
process group of every child it starts ("watch PGID") or sees end ("forget PGID"), and the directories the
stack made for its children ("remove PATH": its Unix sockets, its frame memory under /dev/shm, whose files
would otherwise hold memory until the machine restarts). The pipe closes when its writer dies, however it
dies: without "done" first, every group still watched gets SIGTERM, then SIGKILL once GRACE_SECONDS have
passed, and then the directories are removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# As long as a stopping service is given to drain before the supervisor's own stop kills it.
GRACE_SECONDS = 10.0
POLL_SECONDS = 0.1
WATCH, FORGET, REMOVE, DONE = "watch", "forget", "remove", "done"


@dataclass(frozen=True)
class LeftBehind:
    """What a CLI that died left: the process groups still running and the directories to remove."""

    groups: set[int] = field(default_factory=set)
    directories: list[Path] = field(default_factory=list)


def left_behind(lines: Iterable[str]) -> LeftBehind | None:
    """What is still watched when `lines` end; None when told "done" (the stack was stopped in order)."""
    left = LeftBehind()
    for line in lines:
        verb, _, argument = line.rstrip("\n").partition(" ")
        if verb == DONE:
            return None
        if verb == WATCH:
            left.groups.add(int(argument))
        elif verb == FORGET:
            left.groups.discard(int(argument))
        elif verb == REMOVE:
            left.directories.append(Path(argument))
    return left


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A group of someone else's: the number was reused; not ours to wait for.
        return False
    return True


def signal_groups(groups: Iterable[int], signal_number: int) -> None:
    for group in groups:
        try:
            os.killpg(group, signal_number)
        except (ProcessLookupError, PermissionError):
            continue


def end_groups(
    groups: Iterable[int],
    grace_seconds: float = GRACE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """SIGTERM to each group, then SIGKILL to those still running once the grace has passed."""
    remaining = sorted(groups)
    signal_groups(remaining, signal.SIGTERM)
    deadline = clock() + grace_seconds
    while (remaining := [group for group in remaining if group_alive(group)]) and clock() < deadline:
        sleep(POLL_SECONDS)
    signal_groups(remaining, signal.SIGKILL)


def main() -> int:
    # A Ctrl-C is the CLI's to handle: it stops the stack and then says "done".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    left = left_behind(sys.stdin)
    if left is not None:
        if left.groups:
            end_groups(left.groups)
        # After the children: none of them writes there any more.
        for directory in left.directories:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A CLI killed outright (SIGKILL) takes its embedded stack's children with it: none keeps a port or a store."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from services.cli.orphan_reaper import LeftBehind, end_groups, left_behind
from services.cli.process_supervisor import REPOSITORY_ROOT

STARTUP_TIMEOUT = 60.0

# A "CLI" that supervises a real decoder, prints its pid, and waits to be killed.
SUPERVISING_CLI = """
import sys, threading
from pathlib import Path
from services.cli.process_supervisor import ProcessSupervisor
root, socket, frames = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
supervisor = ProcessSupervisor(root / "logs", 60.0)
supervisor.remove_if_killed(frames)
supervisor.start({"decoder": {
    "SWAPLINE_DECODER_HOST": "127.0.0.1", "SWAPLINE_DECODER_PORT": "0", "SWAPLINE_DECODER_METRICS_PORT": "-1",
    "SWAPLINE_DECODER_MEDIA_ROOT": str(root), "SWAPLINE_DECODER_UNIX_SOCKET": socket,
    "SWAPLINE_DECODER_TRANSPORT_SECURITY": "plaintext", "SWAPLINE_DECODER_AUTH_MODE": "open"}})
print(supervisor.pid("decoder"), supervisor.reaper_pid, flush=True)
threading.Event().wait()
"""


def exits_within(pidfd: int, timeout: float) -> bool:
    """Whether the process behind `pidfd` (not this one's child) ends within `timeout`: its pidfd turns readable."""
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


def test_the_groups_left_watched_are_those_not_forgotten_unless_done() -> None:
    assert left_behind(["watch 10\n", "watch 11\n", "forget 10\n"]) == LeftBehind({11})
    assert left_behind(["watch 10\n", "done\n"]) is None


def test_directories_to_remove_are_left_behind_whole_unless_done() -> None:
    told = ["remove /dev/shm/swapline-frames-a b\n", "watch 3\n"]
    assert left_behind(told) == LeftBehind({3}, [Path("/dev/shm/swapline-frames-a b")])
    assert left_behind([*told, "done\n"]) is None


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    ignoring = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    stubborn = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline()
        end_groups([stubborn.pid], grace_seconds=0.5)
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
    finally:
        stubborn.kill()


def test_a_killed_cli_takes_its_supervised_services_and_their_directories_with_it(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    (frames / "inner").mkdir(parents=True)
    (frames / "inner" / "batch.frames").write_bytes(b"frames")
    with tempfile.TemporaryDirectory(prefix="swapline-test-") as sockets:
        cli = subprocess.Popen(
            [sys.executable, "-c", SUPERVISING_CLI, str(tmp_path), str(Path(sockets) / "decoder.sock"), str(frames)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPOSITORY_ROOT,
        )
        try:
            assert cli.stdout is not None
            decoder_pid, reaper_pid = map(int, cli.stdout.readline().split())
            decoder, reaper = os.pidfd_open(decoder_pid), os.pidfd_open(reaper_pid)
            try:
                assert not exits_within(decoder, 0)
                cli.send_signal(signal.SIGKILL)
                cli.wait(timeout=10)
                assert exits_within(decoder, STARTUP_TIMEOUT)
                # The reaper removes the directories last, then leaves.
                assert exits_within(reaper, STARTUP_TIMEOUT)
                assert not frames.exists()
            finally:
                for process in (decoder, reaper):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(process, signal.SIGKILL)
                    os.close(process)
        finally:
            cli.kill()

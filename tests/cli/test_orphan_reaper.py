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

from services.cli.orphan_reaper import end_groups, watched_groups
from services.cli.process_supervisor import REPOSITORY_ROOT

STARTUP_TIMEOUT = 60.0

# A "CLI" that supervises a real decoder, prints its pid, and waits to be killed.
SUPERVISING_CLI = """
import sys, threading
from pathlib import Path
from services.cli.process_supervisor import ProcessSupervisor
root, socket = Path(sys.argv[1]), sys.argv[2]
supervisor = ProcessSupervisor(root / "logs", 60.0)
supervisor.start({"decoder": {
    "SWAPLINE_DECODER_HOST": "127.0.0.1", "SWAPLINE_DECODER_PORT": "0", "SWAPLINE_DECODER_METRICS_PORT": "-1",
    "SWAPLINE_DECODER_MEDIA_ROOT": str(root), "SWAPLINE_DECODER_UNIX_SOCKET": socket,
    "SWAPLINE_DECODER_TRANSPORT_SECURITY": "plaintext", "SWAPLINE_DECODER_AUTH_MODE": "open"}})
print(supervisor.pid("decoder"), flush=True)
threading.Event().wait()
"""


def exits_within(pidfd: int, timeout: float) -> bool:
    """Whether the process behind `pidfd` (not this one's child) ends within `timeout`: its pidfd turns readable."""
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


def test_the_groups_left_watched_are_those_not_forgotten_unless_done() -> None:
    assert watched_groups(["watch 10\n", "watch 11\n", "forget 10\n"]) == {11}
    assert watched_groups(["watch 10\n", "done\n"]) is None


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    ignoring = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    stubborn = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline()
        end_groups([stubborn.pid], grace_seconds=0.5)
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
    finally:
        stubborn.kill()


def test_a_killed_cli_takes_its_supervised_services_with_it(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="swapline-test-") as sockets:
        cli = subprocess.Popen(
            [sys.executable, "-c", SUPERVISING_CLI, str(tmp_path), str(Path(sockets) / "decoder.sock")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPOSITORY_ROOT,
        )
        try:
            assert cli.stdout is not None
            decoder = os.pidfd_open(int(cli.stdout.readline()))
            try:
                assert not exits_within(decoder, 0)
                cli.send_signal(signal.SIGKILL)
                cli.wait(timeout=10)
                assert exits_within(decoder, STARTUP_TIMEOUT)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(decoder, signal.SIGKILL)
                os.close(decoder)
        finally:
            cli.kill()

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.common.frames import frame_memory
from services.common.frames.frame_memory import (
    DOMAIN_FILE,
    FRAME_MEMORY_METADATA,
    STALE_SECONDS,
    FrameMemory,
    check_tag,
    domain_from_metadata,
    new_tag,
)

MiB = 1024 * 1024


def frames(count: int, value: int = 7) -> np.ndarray:
    return np.full((count, 6, 4), value, np.uint8)


def files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name != DOMAIN_FILE)


def test_a_batch_put_is_taken_whole_and_its_file_goes(tmp_path: Path) -> None:
    sender, receiver = FrameMemory(tmp_path, MiB), FrameMemory(tmp_path, 0)
    sent = np.arange(3 * 6 * 4, dtype=np.uint8).reshape(3, 6, 4)
    name = sender.put(sent, "call1")
    assert name is not None and name.startswith("call1-") and files(tmp_path) == [name]
    taken = receiver.take(name, 3, (6, 4))
    assert np.array_equal(taken, sent)
    assert files(tmp_path) == []


def test_taken_frames_are_writable_and_private(tmp_path: Path) -> None:
    memory = FrameMemory(tmp_path, MiB)
    name = memory.put(frames(2), "")
    assert name is not None
    taken = memory.take(name, 2, (6, 4))
    taken[0] = 1
    assert taken.flags.writeable and int(taken[0, 0, 0]) == 1 and int(taken[1, 0, 0]) == 7


def test_processes_on_one_directory_share_its_domain_and_no_other(tmp_path: Path) -> None:
    first, second = FrameMemory(tmp_path / "a", 0), FrameMemory(tmp_path / "a", 0)
    other = FrameMemory(tmp_path / "b", 0)
    assert first.domain == second.domain and first.shares(second.domain)
    assert not first.shares(other.domain)
    assert not first.shares("")


def test_a_directory_with_a_damaged_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / DOMAIN_FILE).write_text("not a token")
    with pytest.raises(ValueError, match="frame memory token"):
        FrameMemory(tmp_path, 0)


def test_past_its_budget_a_sender_gets_no_file_until_one_is_taken(tmp_path: Path) -> None:
    sender, receiver = FrameMemory(tmp_path, 100), FrameMemory(tmp_path, 0)
    first = sender.put(frames(3), "")  # 72 bytes
    assert first is not None
    assert sender.put(frames(2), "") is None  # 72 + 48 > 100
    receiver.take(first, 3, (6, 4))
    assert sender.put(frames(2), "") is not None
    assert sender.pending_bytes == 48


def test_a_receiver_takes_nothing_when_it_has_no_budget(tmp_path: Path) -> None:
    assert FrameMemory(tmp_path, 0).put(frames(1), "") is None


def test_a_full_directory_sends_frames_in_the_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path: Path, data: np.ndarray) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    memory = FrameMemory(tmp_path, MiB)
    monkeypatch.setattr(frame_memory, "_write_file", full)
    assert memory.put(frames(2), "") is None
    assert memory.pending_bytes == 0


def test_other_write_failures_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: Path, data: np.ndarray) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    memory = FrameMemory(tmp_path, MiB)
    monkeypatch.setattr(frame_memory, "_write_file", denied)
    with pytest.raises(PermissionError):
        memory.put(frames(2), "")
    assert memory.pending_bytes == 0


@pytest.mark.parametrize("name", ["../domain", "a/b.frames", "", ".hidden", "x" * 200])
def test_a_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a file name"):
        FrameMemory(tmp_path, 0).take(name, 1, (6, 4))


def test_a_file_that_is_gone_is_retryable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="no longer in the frame memory"):
        FrameMemory(tmp_path, 0).take("x-1-2-3.frames", 1, (6, 4))


def test_a_file_of_the_wrong_size_is_refused_and_removed(tmp_path: Path) -> None:
    memory = FrameMemory(tmp_path, MiB)
    name = memory.put(frames(2), "")
    assert name is not None
    with pytest.raises(InvalidArgument, match="holds 48 bytes, not 3 frames"):
        memory.take(name, 3, (6, 4))
    assert files(tmp_path) == []


def test_discard_removes_a_calls_files_and_frees_the_budget(tmp_path: Path) -> None:
    memory = FrameMemory(tmp_path, MiB)
    names = [memory.put(frames(1), "") for _ in range(3)]
    memory.discard([name for name in names if name is not None])
    assert files(tmp_path) == [] and memory.pending_bytes == 0


def test_discard_tagged_removes_only_that_calls_files(tmp_path: Path) -> None:
    memory = FrameMemory(tmp_path, MiB)
    mine, theirs = new_tag(), new_tag()
    memory.put(frames(1), mine)
    kept = memory.put(frames(1), theirs)
    memory.discard_tagged(mine)
    assert files(tmp_path) == [kept]


def test_tags_are_plain_words() -> None:
    assert check_tag("abc_123") == "abc_123"
    with pytest.raises(InvalidArgument):
        check_tag("a-b")
    with pytest.raises(InvalidArgument):
        check_tag("")


def test_a_sweep_removes_files_nobody_took_in_time_and_keeps_the_rest(tmp_path: Path) -> None:
    now = [1_000_000.0]
    memory = FrameMemory(tmp_path, MiB, clock=lambda: now[0])
    old, fresh = memory.put(frames(1), ""), memory.put(frames(1), "")
    assert old is not None and fresh is not None
    os.utime(tmp_path / old, (now[0] - STALE_SECONDS - 1, now[0] - STALE_SECONDS - 1))
    os.utime(tmp_path / fresh, (now[0] - 1, now[0] - 1))
    os.utime(tmp_path / DOMAIN_FILE, (0, 0))
    memory.sweep()
    assert files(tmp_path) == [fresh] and (tmp_path / DOMAIN_FILE).exists()


def test_the_domain_is_read_from_the_encoders_metadata() -> None:
    assert domain_from_metadata([("other", "x"), (FRAME_MEMORY_METADATA, "abc")]) == "abc"
    assert domain_from_metadata({FRAME_MEMORY_METADATA: b"abc"}) == "abc"
    assert domain_from_metadata(None) == ""


def test_a_batch_being_written_counts_against_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = FrameMemory(tmp_path, 100)
    write = frame_memory._write_file
    during: list[str | None] = []

    def write_while_another_batch_asks(path: Path, data: np.ndarray) -> None:
        if not during:
            during.append(memory.put(frames(2), ""))  # 72 + 48 > 100, though the first file is not there yet
        write(path, data)

    monkeypatch.setattr(frame_memory, "_write_file", write_while_another_batch_asks)
    assert memory.put(frames(3), "") is not None
    assert during == [None] and memory.pending_bytes == 72


def test_a_full_directory_is_reported_once_until_a_write_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    memory = FrameMemory(tmp_path, MiB)
    write = frame_memory._write_file
    full = [True]

    def sometimes_full(path: Path, data: np.ndarray) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(frame_memory, "_write_file", sometimes_full)
    with caplog.at_level("WARNING", logger=frame_memory.__name__):
        assert memory.put(frames(1), "") is None and memory.put(frames(1), "") is None
        full[0] = False
        assert memory.put(frames(1), "") is not None
        full[0] = True
        assert memory.put(frames(1), "") is None
    assert [record.getMessage().count("is full") for record in caplog.records] == [1, 1]

"""Frames between services on one node through files in a shared memory directory, instead of through the socket.

A 1080p NV12 frame in a gRPC message cost about 6 ms of CPU a hop on the H200 machine (serialising, the socket,
parsing, both ends; docs/benchmarks.md), and every frame makes two hops (decoder -> worker -> encoder). Here the
sender writes a batch's pixels into a new file in a tmpfs directory that both ends mount (one copy), and sends only
its name (common.proto's SharedFrames). The receiver maps the file copy-on-write and removes its name: the frames
are then pages the two processes share until the receiver writes into one of them.

Who shares: a random token written once into the directory (its domain) names it. Two processes exchange frames
this way only when their tokens are equal, so a peer on another node (another directory, another token) or one
without a frame memory gets its frames in the messages, with nothing to configure per pair.

What bounds the memory: a sender counts the bytes of its files that are not yet taken, and past `budget_bytes`
(or with the directory full) sends in the messages instead, where gRPC's flow control holds it back until the
receiver catches up.

What cleans up: a receiver removes each file as it maps it; a sender removes the files of a call that failed or
was cancelled; a receiver that stops reading a stream early removes the files tagged with its call; and files
older than STALE_SECONDS (a process died between writing and reading) go at the next sweep.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mmap
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgument, Unavailable
from services.common.input_limits import excerpt
from services.common.media_paths import write_file
from services.common.settings_loader import ValidatedSettings, ranged

log = logging.getLogger(__name__)

# The initial metadata key an encoder names its domain in (encoder.proto's EncodeSegment).
FRAME_MEMORY_METADATA = "swapline-frame-memory"
DOMAIN_FILE = "domain"
FILE_SUFFIX = ".frames"
# A file nobody took for this long belongs to a call that is over: stream deadlines are a minute by default.
STALE_SECONDS = 600.0
SWEEP_INTERVAL_SECONDS = 60.0
_DOMAIN = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9_]{1,64}")
# The directory full, or its mount's memory limit reached: the frames go in the message instead.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG)
# A 20-chunk job's 1080p NV12 frames, decoded ahead of the workers, fit (25 frames a chunk, 3 MB a frame).
DEFAULT_BUDGET_BYTES = 1024 * 1024 * 1024


def new_tag() -> str:
    """A receiver's name for one call's files (DecodeRequest.frame_memory_tag)."""
    return secrets.token_hex(8)


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise InvalidArgument(f"frame_memory_tag {excerpt(tag)!r} is not 1-64 letters, digits or '_'")
    return tag


def domain_from_metadata(metadata: Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]] | None) -> str:
    """The domain a peer named in its call's metadata; "" when it named none."""
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata or ()
    for key, value in pairs:
        if key == FRAME_MEMORY_METADATA:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return ""


def _read_domain(path: Path) -> str:
    token = path.read_text(encoding="ascii", errors="replace").strip()
    if not _DOMAIN.fullmatch(token):
        raise ValueError(f"{path} does not hold a frame memory token (32 hex digits); remove it to make a new one")
    return token


def directory_domain(directory: Path) -> str:
    """The directory's token, written by whichever process comes first (a link cannot replace a file)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / DOMAIN_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_domain(path)
    draft = directory / f".{DOMAIN_FILE}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    draft.write_text(secrets.token_hex(16), encoding="ascii")
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return _read_domain(path)


def _write_file(path: Path, frames: np.ndarray) -> None:
    """The frames' bytes under a temporary name, renamed when whole (write_file): a reader never maps a partial
    file. The directory is the service user's alone, so the file keeps the default mode."""
    write_file(path, np.ascontiguousarray(frames).reshape(-1).data)


class FrameMemory:
    """One process's view of a frame memory directory: writes batches there (as a sender), takes them (as a
    receiver). Thread-safe: decode threads write while the event loop takes."""

    def __init__(self, directory: Path, budget_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.domain = directory_domain(directory)
        self.budget_bytes = budget_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # Files this process wrote and has not yet seen taken, by name: their bytes count against the budget.
        self._pending: dict[str, int] = {}
        self._pending_bytes = 0
        # Of those, the ones still being written: not there under their name yet, but not taken either.
        self._writing: set[str] = set()
        # Said once while the directory stays full, not at every batch.
        self._full = False
        self._prefix = f"{os.getpid()}-{secrets.token_hex(3)}"
        self._serial = itertools.count()
        self._next_sweep = 0.0
        self.sweep()

    def shares(self, domain: str) -> bool:
        """Whether a peer that names `domain` maps the same directory."""
        return bool(domain) and secrets.compare_digest(domain, self.domain)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _recount(self) -> None:
        """Drops the files receivers have taken since (their names are gone) from the budget's count."""
        gone = [name for name in self._pending if name not in self._writing and not (self.directory / name).exists()]
        for name in gone:
            self._pending_bytes -= self._pending.pop(name)

    def _reserve(self, size: int, tag: str) -> str | None:
        with self._lock:
            if self._pending_bytes + size > self.budget_bytes:
                self._recount()
                if self._pending_bytes + size > self.budget_bytes:
                    return None
            name = f"{tag or 'x'}-{self._prefix}-{next(self._serial)}{FILE_SUFFIX}"
            self._pending[name] = size
            self._pending_bytes += size
            self._writing.add(name)
            return name

    def _release(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                self._pending_bytes -= self._pending.pop(name, 0)
                self._writing.discard(name)

    def put(self, frames: np.ndarray, tag: str = "") -> str | None:
        """Writes the frames into a new file and returns its name; None when they must go in the message instead
        (the budget spent, or the directory full)."""
        name = self._reserve(frames.nbytes, tag)
        if name is None:
            return None
        try:
            _write_file(self.directory / name, frames)
        except OSError as error:
            self._release([name])
            if error.errno not in _FULL:
                raise
            if not self._full:
                log.warning("frame memory %s is full (%s): frames go in the messages", self.directory, error.strerror)
            self._full = True
            return None
        except BaseException:
            self._release([name])
            raise
        with self._lock:
            self._writing.discard(name)
        self._full = False
        self._sweep_when_due()
        return name

    def take(self, name: str, count: int, frame_shape: Sequence[int]) -> np.ndarray:
        """The `count` frames of `frame_shape` in file `name`, mapped copy-on-write (writable, private to this
        process); the name is removed as it is opened."""
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"shared frames: {excerpt(name)!r} is not a file name of the frame memory")
        path = self.directory / name
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            # Swept as stale, or the directory was emptied: the frames are lost, and the call can be made again.
            raise Unavailable(f"shared frames: {name} is no longer in the frame memory") from None
        try:
            os.unlink(path)
            size = os.fstat(descriptor).st_size
            expected = count * int(np.prod(frame_shape))
            if count < 1 or size != expected:
                raise InvalidArgument(f"shared frames: {name} holds {size} bytes, not {count} frames of {expected}")
            mapped = mmap.mmap(descriptor, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(descriptor)
        return np.frombuffer(mapped, np.uint8).reshape(count, *frame_shape)

    def discard(self, names: Iterable[str]) -> None:
        """Removes files this process wrote that may not have been taken (a call that failed or was cancelled)."""
        names = list(names)
        for name in names:
            (self.directory / name).unlink(missing_ok=True)
        self._release(names)

    def discard_tagged(self, tag: str) -> None:
        """Removes the files another process wrote for the call tagged `tag` (a receiver that stopped early)."""
        prefix = f"{check_tag(tag)}-"
        for entry in os.scandir(self.directory):
            if entry.name.startswith(prefix):
                Path(entry.path).unlink(missing_ok=True)

    def sweep(self) -> None:
        """Removes files older than STALE_SECONDS: written by a process that died before they were taken."""
        now = self._clock()
        self._next_sweep = now + SWEEP_INTERVAL_SECONDS
        for entry in os.scandir(self.directory):
            if entry.name == DOMAIN_FILE:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)

    def _sweep_when_due(self) -> None:
        if self._clock() >= self._next_sweep:
            self.sweep()


@dataclass(frozen=True, kw_only=True)
class FrameMemoryReceiverSettings(ValidatedSettings):
    # A directory on tmpfs that this service shares with the services it takes frames from on its node (the
    # embedded stack's own under /dev/shm, a hostPath in the chart); None: frames come in the messages only.
    frame_memory_dir: Path | None = None

    def frame_memory(self) -> FrameMemory | None:
        """Opened at start-up: the directory and its token are made here, so a directory that cannot be fails it.
        A receiver's budget is 0: it only takes."""
        return None if self.frame_memory_dir is None else FrameMemory(self.frame_memory_dir, 0)


@dataclass(frozen=True, kw_only=True)
class FrameMemorySettings(FrameMemoryReceiverSettings):
    # The most bytes of frames this service leaves in the directory for its peers to take; past it, frames go in
    # the messages (and gRPC's flow control slows this service down to the receiver's pace).
    frame_memory_bytes: int = ranged(DEFAULT_BUDGET_BYTES, ge=16 * 1024 * 1024, le=2**40)

    def frame_memory(self) -> FrameMemory | None:
        return None if self.frame_memory_dir is None else FrameMemory(self.frame_memory_dir, self.frame_memory_bytes)

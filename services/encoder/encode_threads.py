"""How many x264 threads a segment gets: the cores this process may use, shared by the segments open at once.

One libx264 stream cannot keep a machine busy. On the 16-core GPU machine at 1080p veryfast, one stream on 16
threads encoded 60 fps, while streams side by side with every core busy reached 220 fps (4 streams of 4
threads), 247 (8x2) and 277 (16x1). So segments encode in parallel, and a segment opened while k segments are
open (itself included) gets cores // k threads, at least one.

The cores are those the scheduler lets this process run on, capped by the CPU quota of its cgroup: a pod
limited to 4 CPUs on a 64-core node must not start 64 threads per segment.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def threads_per_segment(cores: int, open_segments: int) -> int:
    """x264 threads for a segment opened while `open_segments` segments are open, itself included."""
    return max(1, cores // max(1, open_segments))


def usable_cores(affinity: int, quota_cpus: float | None) -> int:
    """The cores the scheduler allows, capped by the cgroup quota (a part-CPU quota still runs a thread)."""
    if quota_cpus is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota_cpus)))


def cgroup_v2_cpus(cpu_max: str) -> float | None:
    """CPUs a cgroup v2 `cpu.max` allows ("400000 100000" is 4 CPUs); None for "max" (no quota)."""
    fields = cpu_max.split()
    if not fields or fields[0] == "max":
        return None
    # The kernel's default period, for a file that gives the quota alone.
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return int(fields[0]) / period


def cgroup_v1_cpus(quota_us: int, period_us: int) -> float | None:
    """CPUs a cgroup v1 CFS quota allows; None for -1 (no quota)."""
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _read_v2(folder: Path) -> float | None:
    try:
        return cgroup_v2_cpus((folder / "cpu.max").read_text())
    except (OSError, ValueError):
        return None


def _read_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return cgroup_v1_cpus(quota, period)


def cgroup_quota_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors, cgroup v2 or v1; None without one.

    Inside a container the mounted hierarchy may start at the container's own cgroup while /proc names the
    host's path, so each ancestor of that path is tried under the mount, down to the mount's root.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _hierarchy, controllers, path = line.split(":", 2)
        read: Callable[[Path], float | None]
        if not controllers:
            mount, read = cgroup_root, _read_v2
        elif "cpu" in controllers.split(","):
            mount, read = cgroup_root / "cpu", _read_v1
        else:
            continue
        relative = PurePosixPath(path)
        for folder in (relative, *relative.parents):
            quota = read(mount / folder.relative_to("/")) if folder.is_absolute() else None
            if quota is not None:
                quotas.append(quota)
    return min(quotas, default=None)


def available_cores() -> int:
    return usable_cores(len(os.sched_getaffinity(0)), cgroup_quota_cpus())


class OpenSegments:
    """Counts the segments being encoded at once and gives each new one its share of the cores."""

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self._open = 0
        self._lock = threading.Lock()

    @contextmanager
    def opened(self) -> Iterator[int]:
        """Counts a segment as open for the block; yields the x264 threads it gets."""
        with self._lock:
            self._open += 1
            threads = threads_per_segment(self.cores, self._open)
        try:
            yield threads
        finally:
            with self._lock:
                self._open -= 1

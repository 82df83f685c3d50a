from __future__ import annotations

from pathlib import Path

from services.encoder.encode_threads import (
    OpenSegments,
    cgroup_quota_cpus,
    cgroup_v1_cpus,
    cgroup_v2_cpus,
    threads_per_segment,
    usable_cores,
)


def test_a_segment_gets_the_cores_shared_by_the_segments_open_with_it() -> None:
    assert threads_per_segment(16, 1) == 16
    assert threads_per_segment(16, 4) == 4
    assert threads_per_segment(16, 8) == 2
    assert threads_per_segment(16, 3) == 5
    assert threads_per_segment(16, 16) == 1
    assert threads_per_segment(16, 40) == 1
    assert threads_per_segment(2, 1) == 2
    assert threads_per_segment(16, 0) == 16


def test_the_cgroup_quota_caps_the_cores_the_scheduler_allows() -> None:
    assert usable_cores(64, 4.0) == 4
    assert usable_cores(64, None) == 64
    assert usable_cores(2, 8.0) == 2
    assert usable_cores(64, 1.5) == 2
    assert usable_cores(64, 0.25) == 1


def test_cgroup_quota_files_parse() -> None:
    assert cgroup_v2_cpus("400000 100000\n") == 4.0
    assert cgroup_v2_cpus("150000 100000") == 1.5
    assert cgroup_v2_cpus("max 100000\n") is None
    assert cgroup_v1_cpus(200000, 100000) == 2.0
    assert cgroup_v1_cpus(-1, 100000) is None


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_pod_limited_to_4_cpus_on_cgroup_v2_sees_4(tmp_path: Path) -> None:
    # A container with its own cgroup namespace: /proc names "/", the mount is the pod's cgroup.
    write(tmp_path / "fs" / "cpu.max", "400000 100000\n")
    proc = write(tmp_path / "cgroup", "0::/\n")
    assert cgroup_quota_cpus(tmp_path / "fs", proc) == 4.0


def test_the_tightest_quota_on_the_path_and_its_ancestors_counts(tmp_path: Path) -> None:
    # No namespace: /proc names the full path; the pod's slice holds the quota, the container has none.
    pod = tmp_path / "fs" / "kubepods.slice" / "pod1.slice"
    write(pod / "cpu.max", "300000 100000\n")
    write(pod / "container.scope" / "cpu.max", "max 100000\n")
    write(tmp_path / "fs" / "cpu.max", "max 100000\n")
    proc = write(tmp_path / "cgroup", "0::/kubepods.slice/pod1.slice/container.scope\n")
    assert cgroup_quota_cpus(tmp_path / "fs", proc) == 3.0


def test_cgroup_v1_quota_is_read_from_the_cpu_mount_even_when_proc_names_a_host_path(tmp_path: Path) -> None:
    write(tmp_path / "fs" / "cpu" / "cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "fs" / "cpu" / "cpu.cfs_period_us", "100000\n")
    proc = write(tmp_path / "cgroup", "5:memory:/kubepods/pod1/abc\n3:cpu,cpuacct:/kubepods/pod1/abc\n0::/\n")
    assert cgroup_quota_cpus(tmp_path / "fs", proc) == 2.5


def test_no_quota_anywhere_is_none(tmp_path: Path) -> None:
    write(tmp_path / "fs" / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "fs" / "cpu" / "cpu.cfs_period_us", "100000\n")
    proc = write(tmp_path / "cgroup", "1:cpu:/\n")
    assert cgroup_quota_cpus(tmp_path / "fs", proc) is None
    assert cgroup_quota_cpus(tmp_path / "fs", tmp_path / "no-proc-file") is None


def test_each_segment_opened_gets_its_share_and_a_closed_one_frees_its_place() -> None:
    segments = OpenSegments(cores=16)
    with segments.opened() as first:
        with segments.opened() as second, segments.opened() as third:
            assert (first, second, third) == (16, 8, 5)
        with segments.opened() as after_two_closed:
            assert after_two_closed == 8
    with segments.opened() as alone:
        assert alone == 16

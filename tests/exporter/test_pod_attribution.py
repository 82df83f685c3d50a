from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.exporter.pod_attribution import (
    NO_POD,
    CgroupPod,
    PodAttributor,
    PodInfo,
    PodRef,
    attributor_for_cluster,
    pod_from_cgroup,
    pod_info_from_api,
)
from tests.exporter.telemetry_fixtures import FakeClock

UID = "5f3c2a1b-9d8e-4f70-a1b2-c3d4e5f60718"
CONTAINER = "b" * 64
OTHER_CONTAINER = "c" * 64

# cgroup v1, cgroupfs driver (several hierarchies, all naming the same pod).
V1_CGROUP = f"""12:pids:/kubepods/burstable/pod{UID}/{CONTAINER}
11:memory:/kubepods/burstable/pod{UID}/{CONTAINER}
1:name=systemd:/kubepods/burstable/pod{UID}/{CONTAINER}
"""
# cgroup v1, guaranteed QoS (no QoS folder).
V1_GUARANTEED = f"4:devices:/kubepods/pod{UID}/{CONTAINER}\n"
# cgroup v2, systemd driver, containerd.
V2_CGROUP = (
    "0::/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CONTAINER}.scope\n"
)
HOST_CGROUP = "0::/user.slice/user-1000.slice/session-3.scope\n"


@pytest.mark.parametrize("text", [V1_CGROUP, V1_GUARANTEED, V2_CGROUP])
def test_pod_uid_and_container_from_cgroup_v1_and_v2(text: str) -> None:
    assert pod_from_cgroup(text) == CgroupPod(pod_uid=UID, container_id=CONTAINER)


def test_processes_outside_kubernetes_have_no_pod() -> None:
    assert pod_from_cgroup(HOST_CGROUP) is None
    assert pod_from_cgroup("") is None


class FakeLister:
    def __init__(self, pods: list[PodInfo]) -> None:
        self.pods = pods
        self.calls = 0
        self.failure: Exception | None = None

    def list_pods(self) -> list[PodInfo]:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return list(self.pods)


def write_proc(root: Path, pid: int, cgroup: str) -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "cgroup").write_text(cgroup)


WORKER = PodInfo(uid=UID, name="worker-7", namespace="swapline", containers=((CONTAINER, "worker"),))


def test_attributes_pids_through_cgroups_to_pod_namespace_and_container(tmp_path: Path) -> None:
    write_proc(tmp_path, 100, V1_CGROUP)
    write_proc(tmp_path, 200, V2_CGROUP)
    write_proc(tmp_path, 300, HOST_CGROUP)
    attributor = PodAttributor(FakeLister([WORKER]), proc_root=tmp_path, clock=FakeClock())

    refs = attributor.attribute([100, 200, 300, 400])

    expected = PodRef(pod="worker-7", namespace="swapline", container="worker")
    assert refs == {100: expected, 200: expected, 300: NO_POD, 400: NO_POD}


def test_pod_list_is_fetched_at_most_every_thirty_seconds(tmp_path: Path) -> None:
    write_proc(tmp_path, 100, V2_CGROUP)
    clock = FakeClock()
    lister = FakeLister([])
    attributor = PodAttributor(lister, proc_root=tmp_path, clock=clock)

    assert attributor.attribute([100])[100] == NO_POD
    lister.pods = [WORKER]
    clock.advance(29.0)
    assert attributor.attribute([100])[100] == NO_POD
    assert lister.calls == 1

    clock.advance(1.0)
    assert attributor.attribute([100])[100].pod == "worker-7"
    assert lister.calls == 2

    clock.advance(300.0)
    attributor.attribute([100])
    assert lister.calls == 2  # every process resolves from the cache: no need to ask


def test_a_restarted_container_is_looked_up_again(tmp_path: Path) -> None:
    write_proc(tmp_path, 100, V2_CGROUP.replace(CONTAINER, OTHER_CONTAINER))
    clock = FakeClock()
    lister = FakeLister([WORKER])
    attributor = PodAttributor(lister, proc_root=tmp_path, clock=clock)

    assert attributor.attribute([100])[100] == PodRef(pod="worker-7", namespace="swapline", container="")
    lister.pods = [PodInfo(uid=UID, name="worker-7", namespace="swapline", containers=((OTHER_CONTAINER, "worker"),))]
    clock.advance(30.0)
    assert attributor.attribute([100])[100].container == "worker"


def test_api_failures_keep_the_old_list_and_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_proc(tmp_path, 100, V2_CGROUP)
    write_proc(tmp_path, 101, V2_CGROUP.replace(UID.replace("-", "_"), "0" * 8 + "_0000_0000_0000_" + "0" * 12))
    clock = FakeClock()
    lister = FakeLister([WORKER])
    attributor = PodAttributor(lister, proc_root=tmp_path, clock=clock)
    attributor.attribute([100])
    lister.failure = ConnectionError("apiserver unreachable")

    with caplog.at_level(logging.WARNING, logger="services.exporter.pod_attribution"):
        for _ in range(3):
            clock.advance(30.0)
            refs = attributor.attribute([100, 101])

    assert refs[100].pod == "worker-7"
    assert refs[101] == NO_POD
    assert lister.calls == 4
    assert len(caplog.records) == 1
    assert "apiserver unreachable" in caplog.records[0].getMessage()


def test_pod_info_from_api_objects_strips_the_runtime_prefix() -> None:
    pod = SimpleNamespace(
        metadata=SimpleNamespace(uid=UID, name="worker-7", namespace="swapline"),
        status=SimpleNamespace(
            container_statuses=[
                SimpleNamespace(name="worker", container_id=f"containerd://{CONTAINER}"),
                SimpleNamespace(name="starting", container_id=None),
            ],
            init_container_statuses=None,
        ),
    )

    assert pod_info_from_api(pod) == WORKER


def test_attribution_is_off_outside_a_cluster(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with caplog.at_level(logging.INFO, logger="services.exporter.pod_attribution"):
        assert attributor_for_cluster(True, "node-1") is None
        assert attributor_for_cluster(False, "node-1") is None
    assert len(caplog.records) == 2
    assert "not running in a Kubernetes cluster" in caplog.records[0].getMessage()


def test_attribution_is_off_when_the_in_cluster_config_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The variable says "cluster" but there is no service account token on this machine.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with caplog.at_level(logging.INFO, logger="services.exporter.pod_attribution"):
        assert attributor_for_cluster(True, "node-1") is None
    assert "pod attribution is off" in caplog.records[0].getMessage()

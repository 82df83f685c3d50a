"""Which pod, namespace and container a GPU process belongs to: PID -> cgroup -> pod UID -> Kubernetes API.

The exporter needs `hostPID: true` for host PIDs to appear under /proc; without it, or outside
Kubernetes, every process keeps empty pod labels.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

POD_REFRESH_SECONDS = 30.0


def _uid_pattern(separator: str) -> str:
    return separator.join(f"[0-9a-f]{{{width}}}" for width in (8, 4, 4, 4, 12))


# cgroup v1 (cgroupfs driver): .../kubepods/burstable/pod<uid>/<container id>
_V1_POD = re.compile(rf"/kubepods(?:/[a-z]+)?/pod(?P<uid>{_uid_pattern('-')})")
# cgroup v2 or the systemd driver: kubepods-burstable-pod<uid with underscores>.slice
_SLICE_POD = re.compile(rf"kubepods(?:-[a-z]+)?-pod(?P<uid>{_uid_pattern('_')})\.slice")
# The container: a bare 64-hex id (v1) or <runtime>-<id>.scope such as cri-containerd-<id>.scope.
_CONTAINER_ID = re.compile(r"(?:^|/)(?:[a-z-]+-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class PodRef:
    pod: str = ""
    namespace: str = ""
    container: str = ""


NO_POD = PodRef()


@dataclass(frozen=True)
class CgroupPod:
    pod_uid: str
    container_id: str


@dataclass(frozen=True)
class PodInfo:
    uid: str
    name: str
    namespace: str
    # container id (without the runtime:// prefix) -> container name
    containers: tuple[tuple[str, str], ...] = ()


class PodLister(Protocol):
    def list_pods(self) -> list[PodInfo]: ...


def pod_from_cgroup(cgroup_text: str) -> CgroupPod | None:
    """The pod UID and container id named by a /proc/<pid>/cgroup file, or None outside Kubernetes."""
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1].strip()
        v1 = _V1_POD.search(path)
        uid = v1.group("uid") if v1 else None
        if uid is None:
            slice_match = _SLICE_POD.search(path)
            uid = slice_match.group("uid").replace("_", "-") if slice_match else None
        if uid is not None:
            container = _CONTAINER_ID.search(path)
            return CgroupPod(pod_uid=uid, container_id=container.group("id") if container else "")
    return None


def _container_id(runtime_id: str) -> str:
    return runtime_id.split("://", 1)[-1]


def pod_info_from_api(pod: Any) -> PodInfo:
    statuses = (
        [
            *(pod.status.container_statuses or []),
            *(pod.status.init_container_statuses or []),
        ]
        if pod.status is not None
        else []
    )
    return PodInfo(
        uid=pod.metadata.uid,
        name=pod.metadata.name,
        namespace=pod.metadata.namespace,
        containers=tuple(
            (_container_id(status.container_id), status.name) for status in statuses if status.container_id
        ),
    )


class KubernetesPodLister:
    """Lists this node's pods through the in-cluster API; the kubernetes client is imported only here."""

    def __init__(self, node_name: str) -> None:
        from kubernetes import client, config

        config.load_incluster_config()
        self._api = client.CoreV1Api()
        self._node_name = node_name

    def list_pods(self) -> list[PodInfo]:
        pods = self._api.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self._node_name}", _request_timeout=5
        )
        return [pod_info_from_api(pod) for pod in pods.items]


class PodAttributor:
    """Maps PIDs to pods; the pod list is cached and fetched again at most every 30 seconds."""

    def __init__(
        self,
        lister: PodLister,
        *,
        proc_root: Path = Path("/proc"),
        clock: Callable[[], float] = time.monotonic,
        refresh_seconds: float = POD_REFRESH_SECONDS,
    ) -> None:
        self._lister = lister
        self._proc_root = proc_root
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._pods: dict[str, PodInfo] = {}
        self._listed_at: float | None = None
        self._last_error = ""

    def _cgroup_pod(self, pid: int) -> CgroupPod | None:
        try:
            # os.path rather than pathlib: new PIDs every sweep should not churn interned path strings.
            with open(os.path.join(self._proc_root, str(pid), "cgroup"), encoding="utf-8", errors="replace") as cgroup:
                text = cgroup.read()
        except OSError:
            return None
        return pod_from_cgroup(text)

    def _resolves(self, found: CgroupPod) -> bool:
        pod = self._pods.get(found.pod_uid)
        return pod is not None and (not found.container_id or found.container_id in dict(pod.containers))

    def _refresh_if_due(self, wanted: Iterable[CgroupPod]) -> None:
        """Lists the pods again when some process is in a pod or container the cache does not know yet."""
        now = self._clock()
        if self._listed_at is not None and now - self._listed_at < self._refresh_seconds:
            return
        if all(self._resolves(found) for found in wanted):
            return
        self._listed_at = now
        try:
            pods = self._lister.list_pods()
        except Exception as error:  # the API being away must never stop the sampling
            message = f"{type(error).__name__}: {error}"
            if message != self._last_error:
                log.warning("listing this node's pods failed, keeping the last list: %s", message)
                self._last_error = message
            return
        self._last_error = ""
        self._pods = {pod.uid: pod for pod in pods}

    def attribute(self, pids: Iterable[int]) -> dict[int, PodRef]:
        """PodRef per PID; PIDs outside pods (or not visible) map to NO_POD."""
        cgroups = {pid: self._cgroup_pod(pid) for pid in pids}
        wanted = [found for found in cgroups.values() if found is not None]
        if wanted:
            self._refresh_if_due(wanted)
        refs: dict[int, PodRef] = {}
        for pid, found in cgroups.items():
            pod = self._pods.get(found.pod_uid) if found is not None else None
            if found is None or pod is None:
                refs[pid] = NO_POD
                continue
            container = dict(pod.containers).get(found.container_id, "")
            refs[pid] = PodRef(pod=pod.name, namespace=pod.namespace, container=container)
        return refs


def attributor_for_cluster(enabled: bool, node_name: str) -> PodAttributor | None:
    """The attributor when running in a cluster with attribution on; otherwise None, said once in the log."""
    if not enabled:
        log.info("pod attribution is off (SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION=false)")
        return None
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.info("pod attribution is off: not running in a Kubernetes cluster")
        return None
    try:
        lister = KubernetesPodLister(node_name)
    except Exception as error:  # no client library, no service account: attribution off, exporter on
        log.info("pod attribution is off: %s: %s", type(error).__name__, error)
        return None
    return PodAttributor(lister)

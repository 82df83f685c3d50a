"""Which pod containers hold each GPU: the kubelet's pod-resources API (v1.PodResourcesLister/List).

The kubelet lists, for every container of its node, the device ids each device plugin allocated to it; the
NVIDIA device plugin's ids for `nvidia.com/gpu` are the GPUs' UUIDs, which NVML reports too. dcgm-exporter
attributes GPUs the same way. The API is a Unix socket under /var/lib/kubelet/pod-resources, which the chart
mounts read-only: the exporter needs neither the host's PID namespace nor access to the Kubernetes API.

A GPU shared by time-slicing is listed once per container holding a replica of it ("<uuid>::<replica>"), so a
GPU maps to every container holding it. MIG devices are listed by their own MIG UUIDs, which are not the
GPUs' UUIDs, so a MIG-partitioned GPU shows no holder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from services.common.gpu_telemetry import GpuSample
from swapline.k8s.podresources.v1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

# The NVIDIA device plugin's resource, and its name for time-sliced replicas under `renameByDefault`.
GPU_RESOURCE_NAMES = frozenset({"nvidia.com/gpu", "nvidia.com/gpu.shared"})
REPLICA_SEPARATOR = "::"
# Pods change on the scale of seconds to minutes; a listing every 10 s costs the kubelet nothing.
REFRESH_SECONDS = 10.0
# The listing runs in the sampling thread: a kubelet that hangs may delay one sweep by this much at most.
LIST_TIMEOUT_SECONDS = 1.0
# gRPC waits up to 2 minutes between reconnection attempts by default; a restarted kubelet is back sooner.
MAX_RECONNECT_BACKOFF_MS = 5_000


@dataclass(frozen=True, order=True)
class PodRef:
    namespace: str = ""
    pod: str = ""
    container: str = ""


NO_POD = PodRef()

# Device id (a GPU UUID, or a GPU index under the device plugin's `index` id strategy) -> the containers
# holding it, sorted.
GpuHolders = Mapping[str, tuple[PodRef, ...]]


class GpuHolderLister(Protocol):
    def list_gpu_holders(self) -> GpuHolders: ...

    def close(self) -> None: ...


def gpu_device_id(device_id: str) -> str:
    """The GPU a device id names: a time-sliced replica "<uuid>::<n>" names the GPU <uuid>."""
    return device_id.split(REPLICA_SEPARATOR, 1)[0]


def gpu_holders(response: api_pb2.ListPodResourcesResponse) -> dict[str, tuple[PodRef, ...]]:
    """The GPU holders in one List answer; devices of other resources are left out."""
    holders: dict[str, set[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            holder = PodRef(namespace=pod.namespace, pod=pod.name, container=container.name)
            for devices in container.devices:
                if devices.resource_name not in GPU_RESOURCE_NAMES:
                    continue
                for device_id in devices.device_ids:
                    holders.setdefault(gpu_device_id(device_id), set()).add(holder)
    return {device: tuple(sorted(refs)) for device, refs in holders.items()}


def holders_of(holders: GpuHolders, sample: GpuSample) -> tuple[PodRef, ...]:
    return holders.get(sample.uuid) or holders.get(str(sample.index)) or ()


class KubeletPodResources:
    """A client of the kubelet's pod-resources socket; gRPC reconnects by itself after a kubelet restart."""

    def __init__(self, socket_path: Path, timeout_seconds: float = LIST_TIMEOUT_SECONDS) -> None:
        self._channel = grpc.insecure_channel(
            f"unix:{socket_path.absolute()}", options=[("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        )
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        self._timeout = timeout_seconds

    def list_gpu_holders(self) -> GpuHolders:
        return gpu_holders(self._stub.List(api_pb2.ListPodResourcesRequest(), timeout=self._timeout))

    def close(self) -> None:
        self._channel.close()


class PodAttributor:
    """The GPU holders, listed again at most every refresh_seconds.

    When the kubelet cannot answer the holders are dropped rather than kept: a GPU without a pod is honest,
    one labelled with a pod that may have gone is not. The reason is logged once.
    """

    def __init__(
        self,
        lister: GpuHolderLister,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        self._lister = lister
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._holders: GpuHolders = {}
        self._listed_at: float | None = None
        self._last_error = ""

    def holders(self) -> GpuHolders:
        now = self._clock()
        if self._listed_at is None or now - self._listed_at >= self._refresh_seconds:
            self._listed_at = now
            self._holders = self._list()
        return self._holders

    def _list(self) -> GpuHolders:
        try:
            holders = self._lister.list_gpu_holders()
        except Exception as error:  # the kubelet being away must never stop the sampling
            message = f"{type(error).__name__}: {error}"
            if message != self._last_error:
                log.warning("the kubelet's pod-resources API did not answer, GPUs go without pods: %s", message)
                self._last_error = message
            return {}
        if self._last_error:
            log.info("the kubelet's pod-resources API answers again")
            self._last_error = ""
        return holders

    def close(self) -> None:
        self._lister.close()


def attributor_for_node(enabled: bool, socket_path: Path) -> PodAttributor | None:
    """The attributor where the kubelet's pod-resources folder is mounted and attribution is on; else None.

    The folder rather than the socket decides: the kubelet re-creates the socket when it restarts, and the
    client reconnects to the new one.
    """
    if not enabled:
        log.info("pod attribution is off (SWAPLINE_EXPORTER_KUBERNETES_ATTRIBUTION=false)")
        return None
    if not socket_path.parent.is_dir():
        log.info("pod attribution is off: no kubelet pod-resources folder for %s (not a Kubernetes node)", socket_path)
        return None
    return PodAttributor(KubeletPodResources(socket_path))

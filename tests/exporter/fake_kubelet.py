"""A fake kubelet: the real pod-resources v1 API (v1.PodResourcesLister) served by grpc.aio on a Unix socket.

It runs on an event loop of its own in a background thread, so that the exporter's synchronous client can
call it from the test's thread (or from an exporter process) as it calls the kubelet.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from swapline.k8s.podresources.v1 import api_pb2, api_pb2_grpc

START_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Devices:
    resource_name: str
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class Container:
    name: str
    devices: tuple[Devices, ...] = ()
    cpu_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    containers: tuple[Container, ...]


def list_response(pods: tuple[Pod, ...]) -> api_pb2.ListPodResourcesResponse:
    return api_pb2.ListPodResourcesResponse(
        pod_resources=[
            api_pb2.PodResources(
                name=pod.name,
                namespace=pod.namespace,
                containers=[
                    api_pb2.ContainerResources(
                        name=container.name,
                        devices=[
                            api_pb2.ContainerDevices(
                                resource_name=devices.resource_name,
                                device_ids=list(devices.device_ids),
                                topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=0)]),
                            )
                            for devices in container.devices
                        ],
                        cpu_ids=list(container.cpu_ids),
                    )
                    for container in pod.containers
                ],
            )
            for pod in pods
        ]
    )


class FakeKubelet(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, pods: tuple[Pod, ...]) -> None:
        self.pods = pods
        self.list_calls = 0

    async def List(
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        self.list_calls += 1
        return list_response(self.pods)


@contextmanager
def serving(kubelet: FakeKubelet, socket_path: Path) -> Iterator[FakeKubelet]:
    """Serves `kubelet` on `socket_path` until the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-kubelet", daemon=True)
    thread.start()

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(kubelet, server)
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_SECONDS)
    try:
        yield kubelet
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(START_TIMEOUT_SECONDS)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_SECONDS)
        loop.close()

"""A small Kubernetes API server on 127.0.0.1 answering GET /api/v1/nodes with NodeList JSON as a real API
server writes it (paged by limit and continue), or with a failure Status, or not at all until released."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from kubernetes.client import Configuration

# What one request gets, in order; once the script runs out every request gets the nodes.
Answer = Literal["nodes", "hang"] | int
NODES_PATH = "/api/v1/nodes"
SERVICE_ACCOUNT = "system:serviceaccount:media:demo-swapline-advisor"

_CPU_NODE_RESOURCES = {
    "cpu": "16",
    "ephemeral-storage": "104845292Ki",
    "hugepages-1Gi": "0",
    "hugepages-2Mi": "0",
    "memory": "65023532Ki",
    "pods": "110",
}


def node(
    name: str, *, product: str = "", gpus: int = 0, allocatable_gpus: int | None = None, index: int = 1
) -> dict[str, Any]:
    """A node as `kubectl get node -o json` shows one on EKS with the NVIDIA GPU operator (GPU feature
    discovery's labels, the device plugin's nvidia.com/gpu). No product and no GPUs: a CPU node."""
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "g6.12xlarge" if gpus else "m6i.4xlarge",
        "topology.kubernetes.io/region": "us-east-1",
        "topology.kubernetes.io/zone": "us-east-1a",
    }
    if product:
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": "23034",
            "nvidia.com/cuda.driver.major": "550",
            "nvidia.com/gfd.timestamp": "1764576000",
        }
    capacity = dict(_CPU_NODE_RESOURCES)
    allocatable = dict(_CPU_NODE_RESOURCES, cpu="15890m", memory="64006700Ki")
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
        allocatable["nvidia.com/gpu"] = str(gpus if allocatable_gpus is None else allocatable_gpus)
    heartbeat = "2026-12-01T08:00:00Z"
    return {
        "metadata": {
            "name": name,
            "uid": f"5f0c6a1e-0000-4000-8000-{index:012d}",
            "resourceVersion": str(4000 + index),
            "creationTimestamp": "2026-11-30T08:00:00Z",
            "labels": labels,
            "annotations": {
                "alpha.kubernetes.io/provided-node-ip": f"10.0.1.{index}",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {
            "providerID": f"aws:///us-east-1a/i-0{index:016x}",
            **({"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]} if gpus else {}),
        },
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastHeartbeatTime": heartbeat,
                    "lastTransitionTime": "2026-11-30T08:01:00Z",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": f"10.0.1.{index}"},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": f"7d4c2f8e-0000-4000-8000-{index:012d}",
                "containerRuntimeVersion": "containerd://1.7.27",
                "kernelVersion": "6.1.141-155.222.amzn2023.x86_64",
                "kubeProxyVersion": "v1.31.7-eks-473151a",
                "kubeletVersion": "v1.31.7-eks-473151a",
                "machineID": f"ec2{index:029x}",
                "operatingSystem": "linux",
                "osImage": "Amazon Linux 2023.7.20250512",
                "systemUUID": f"ec2{index:05x}-0000-0000-0000-000000000000",
            },
        },
    }


def _status(code: int) -> dict[str, Any]:
    """The Status body the API server sends with a failure."""
    phrase = HTTPStatus(code).phrase
    message = f'nodes is forbidden: User "{SERVICE_ACCOUNT}" cannot list resource "nodes" in API group "" at the '
    message += "cluster scope"
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message if code == HTTPStatus.FORBIDDEN else phrase,
        "reason": phrase.replace(" ", ""),
        "details": {"kind": "nodes"},
        "code": code,
    }


class FakeKubernetesApi:
    def __init__(self, nodes: Sequence[dict[str, Any]], script: Sequence[Answer] = ()) -> None:
        self.nodes = list(nodes)
        self._script = list(script)
        # The query of each request, in order.
        self.queries: list[dict[str, list[str]]] = []
        self._arrived = threading.Condition()
        # Set when the test ends: a "hang" answer waits for it.
        self.released = threading.Event()

    def answer_for(self, query: dict[str, list[str]]) -> Answer:
        with self._arrived:
            self.queries.append(query)
            self._arrived.notify_all()
            return self._script.pop(0) if self._script else "nodes"

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.queries) >= count, timeout)

    def page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        start = int(query.get("continue", ["0"])[0])
        limit = int(query.get("limit", [str(len(self.nodes))])[0])
        end = start + limit
        metadata: dict[str, Any] = {"resourceVersion": "4242"}
        if end < len(self.nodes):
            metadata["continue"] = str(end)
            metadata["remainingItemCount"] = len(self.nodes) - end
        return {"kind": "NodeList", "apiVersion": "v1", "metadata": metadata, "items": self.nodes[start:end]}


def _handler(api: FakeKubernetesApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != NODES_PATH:
                self._send(HTTPStatus.NOT_FOUND, _status(HTTPStatus.NOT_FOUND))
                return
            query = parse_qs(url.query)
            answer = api.answer_for(query)
            if answer == "hang":
                api.released.wait()
                return
            if isinstance(answer, int):
                self._send(answer, _status(answer))
                return
            self._send(HTTPStatus.OK, api.page(query))

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the tests read the recorded queries instead."""

    return Handler


@contextmanager
def serving(api: FakeKubernetesApi) -> Iterator[Configuration]:
    """Serves `api` and yields a client configuration pointing at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    server.daemon_threads = True
    # A short poll lets shutdown() return at once.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        api.released.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

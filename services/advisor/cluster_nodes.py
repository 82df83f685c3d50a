"""Reads the cluster's GPU nodes through the Kubernetes API (the official client), off the event loop.

Only `python -m services.advisor` imports this module, where SWAPLINE_ADVISOR_CLUSTER_NODES asks for it: the
client takes most of a second to import, which the CLI's commands should not pay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import urllib3
from kubernetes.client import ApiClient, ApiException, Configuration, CoreV1Api, V1Node
from kubernetes.config import ConfigException, load_incluster_config
from kubernetes.utils import parse_quantity

from services.advisor.cluster_inventory import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    ClusterInventory,
    LatestInventory,
    NodeGpus,
    group_by_product,
)
from services.common.errors import Unavailable
from services.common.gpu_catalog import GpuCatalog

log = logging.getLogger(__name__)

# Nodes per list request; the API's continue token fetches the rest.
PAGE_SIZE = 500
# A blocking read of every GPU node (it raises Unavailable); refresh_cluster runs it in a thread.
NodeReader = Callable[[], tuple[NodeGpus, ...]]


def in_cluster_configuration() -> Configuration:
    """The pod's ServiceAccount: its token and CA under /var/run/secrets/kubernetes.io/serviceaccount and
    KUBERNETES_SERVICE_HOST/PORT. The client re-reads the token as the kubelet rotates it."""
    configuration = Configuration()
    load_incluster_config(client_configuration=configuration)
    return configuration


def _gpu_count(resources: dict[str, str] | None) -> int:
    return int(parse_quantity((resources or {}).get(GPU_RESOURCE, "0")))


def node_gpus(node: V1Node) -> NodeGpus | None:
    """The node's GPUs; None for a node with neither the product label nor a GPU in its capacity."""
    labels = (node.metadata.labels if node.metadata else None) or {}
    status = node.status
    capacity = _gpu_count(status.capacity if status else None)
    product = labels.get(GPU_PRODUCT_LABEL, "")
    if not product and capacity == 0:
        return None
    return NodeGpus(
        node=(node.metadata.name if node.metadata else None) or "",
        product=product,
        capacity=capacity,
        allocatable=_gpu_count(status.allocatable if status else None),
    )


def _api_failure(error: ApiException) -> str:
    hint = ""
    if error.status == 403:
        hint = " (the advisor's ServiceAccount needs nodes get and list: the chart's advisor.clusterNodes.enabled)"
    return f"the Kubernetes API answered {error.status} {error.reason}{hint}"


class KubernetesNodeReader:
    """Lists the nodes page by page, each request bounded by timeout_seconds; blocking."""

    def __init__(
        self, configure: Callable[[], Configuration], timeout_seconds: float, page_size: int = PAGE_SIZE
    ) -> None:
        self._configure = configure
        self._timeout_seconds = timeout_seconds
        self._page_size = page_size

    def __call__(self) -> tuple[NodeGpus, ...]:
        try:
            configuration = self._configure()
            # The next refresh is the retry: no request outlasts timeout_seconds.
            configuration.retries = 0
            with ApiClient(configuration) as api_client:
                return self._list(CoreV1Api(api_client))
        except ConfigException as error:
            raise Unavailable(f"no in-cluster Kubernetes configuration: {error}") from None
        except ApiException as error:
            raise Unavailable(_api_failure(error)) from None
        except urllib3.exceptions.MaxRetryError as error:
            # Retries are off: the reason is the one attempt's failure (a refused connection, a timeout).
            raise Unavailable(f"could not reach the Kubernetes API: {error.reason or error}") from None
        except urllib3.exceptions.HTTPError as error:
            raise Unavailable(f"could not reach the Kubernetes API: {error}") from None
        except (OSError, ValueError) as error:
            # OSError: the token or CA file; ValueError: a node list or quantity that does not parse.
            raise Unavailable(f"could not read the nodes: {error}") from None

    def _list(self, api: CoreV1Api) -> tuple[NodeGpus, ...]:
        found: list[NodeGpus] = []
        token: str | None = None
        while True:
            page = api.list_node(limit=self._page_size, _continue=token, _request_timeout=self._timeout_seconds)
            found.extend(gpus for node in page.items if (gpus := node_gpus(node)) is not None)
            token = page.metadata._continue if page.metadata else None
            if not token:
                return tuple(found)


async def refresh_cluster(latest: LatestInventory, read_nodes: NodeReader, catalog: GpuCatalog) -> ClusterInventory:
    """One read into `latest`. A failure is logged once per run of failures and reported, never raised."""
    try:
        nodes = await asyncio.to_thread(read_nodes)
    except Unavailable as error:
        if latest.record_failure(error.message):
            log.warning("could not read the cluster's GPU nodes (retrying every refresh): %s", error.message)
        return latest.inventory
    if latest.record_read(group_by_product(nodes, catalog), time.time()):
        log.info("read the cluster's GPU nodes again")
    return latest.inventory


async def refresh_cluster_forever(
    latest: LatestInventory, read_nodes: NodeReader, catalog: GpuCatalog, refresh_seconds: float
) -> None:
    while True:
        inventory = await refresh_cluster(latest, read_nodes, catalog)
        log.debug("cluster GPUs %s", inventory.gpus)
        await asyncio.sleep(refresh_seconds)

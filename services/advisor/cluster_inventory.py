"""The GPUs the cluster has: its GPU nodes grouped by product and matched to the GPU catalog.

Shown beside the recommendations, never used to narrow them: a node pool that scales to zero lists no nodes
until it has work, so a GPU absent here may still be one the cluster can get.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.common.gpu_catalog import GpuCatalog, GpuSpec

# The node label GPU feature discovery sets from NVML's model name, spaces turned into hyphens
# (NVIDIA-L4, Tesla-T4, NVIDIA-A100-SXM4-80GB).
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# The extended resource the NVIDIA device plugin advertises in each node's capacity and allocatable.
GPU_RESOURCE = "nvidia.com/gpu"
# GPU feature discovery appends this to the product of a GPU shared by time-slicing: the same GPU model.
_SHARED_SUFFIX = "-SHARED"


@dataclass(frozen=True)
class NodeGpus:
    """One node's GPUs as its labels and status give them."""

    node: str
    # "" where the node has GPUs but no product label (GPU feature discovery not running there).
    product: str
    capacity: int
    allocatable: int


@dataclass(frozen=True)
class ClusterGpus:
    """The nodes of one GPU product."""

    product: str
    # The catalog entry the product denotes; "" when the catalog lacks it (reported all the same).
    catalog_gpu: str
    nodes: int
    capacity: int
    allocatable: int

    @property
    def summary(self) -> str:
        """E.g. `4 x NVIDIA-L4 on 2 nodes (L4 24GB in the catalog)`."""
        product = self.product or f"GPU without a {GPU_PRODUCT_LABEL} label"
        nodes = f"{self.nodes} node" if self.nodes == 1 else f"{self.nodes} nodes"
        known = f"{self.catalog_gpu} in the catalog" if self.catalog_gpu else "not in the catalog"
        return f"{self.capacity} x {product} on {nodes} ({known})"


@dataclass(frozen=True)
class ClusterInventory:
    # False when the advisor does not read the cluster (SWAPLINE_ADVISOR_CLUSTER_NODES=off).
    enabled: bool
    gpus: tuple[ClusterGpus, ...] = ()
    # When gpus were read, in seconds since the epoch; 0 before the first successful read.
    read_at: float = 0.0
    # Why the latest read failed; "" when it succeeded. gpus keep the last successful read.
    error: str = ""

    def gpus_of(self, catalog_gpu: str) -> int:
        """How many GPUs of this catalog entry the cluster's nodes have (their capacity)."""
        return sum(group.capacity for group in self.gpus if group.catalog_gpu == catalog_gpu)

    def note_on(self, catalog_gpu: str) -> str:
        """What a recommendation of this GPU adds about the cluster; "" until the nodes have been read."""
        if not self.read_at:
            return ""
        count = self.gpus_of(catalog_gpu)
        return f"the cluster has {count} of them" if count else "the cluster has none"


# What the recommendations see where the advisor does not read the cluster.
NO_CLUSTER = ClusterInventory(enabled=False)


def _product_key(text: str) -> str:
    # GPU feature discovery writes NVML's "NVIDIA A100-SXM4-80GB" as NVIDIA-A100-SXM4-80GB: compare both with
    # hyphens and spaces alike.
    return " ".join(text.lower().replace("-", " ").split())


def catalog_gpu_for_product(product: str, catalog: GpuCatalog) -> GpuSpec | None:
    """The catalog entry a node's nvidia.com/gpu.product denotes; None for a product the catalog lacks.

    A time-sliced GPU (-SHARED) is the same model; a MIG slice (-MIG-1g.10gb) has less memory than the GPU,
    so it matches no entry.
    """
    wanted = _product_key(product.removesuffix(_SHARED_SUFFIX))
    if not wanted:
        return None
    for gpu in catalog.gpus:
        if wanted in {_product_key(name) for name in (gpu.name, *gpu.nvml_names)}:
            return gpu
    return None


def group_by_product(nodes: Iterable[NodeGpus], catalog: GpuCatalog) -> tuple[ClusterGpus, ...]:
    """One group per product (most GPUs first), each matched to the catalog."""
    by_product: dict[str, list[NodeGpus]] = {}
    for node in nodes:
        by_product.setdefault(node.product, []).append(node)
    groups = []
    for product, members in by_product.items():
        gpu = catalog_gpu_for_product(product, catalog)
        groups.append(
            ClusterGpus(
                product=product,
                catalog_gpu=gpu.name if gpu is not None else "",
                nodes=len(members),
                capacity=sum(node.capacity for node in members),
                allocatable=sum(node.allocatable for node in members),
            )
        )
    return tuple(sorted(groups, key=lambda group: (-group.capacity, group.product)))


class LatestInventory:
    """The inventory as last read: the refresh loop writes it, every call reads it (both on the event loop)."""

    def __init__(self, enabled: bool) -> None:
        self._inventory = ClusterInventory(enabled=enabled)

    @property
    def inventory(self) -> ClusterInventory:
        return self._inventory

    def record_read(self, gpus: tuple[ClusterGpus, ...], read_at: float) -> bool:
        """Stores a successful read; True when it ends a run of failures."""
        recovered = bool(self._inventory.error)
        self._inventory = ClusterInventory(enabled=True, gpus=gpus, read_at=read_at)
        return recovered

    def record_failure(self, error: str) -> bool:
        """Keeps the last good GPUs and reports why the read failed; True for the first failure of a run."""
        first = not self._inventory.error
        current = self._inventory
        self._inventory = ClusterInventory(enabled=True, gpus=current.gpus, read_at=current.read_at, error=error)
        return first

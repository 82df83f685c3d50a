"""What the servicer and the refresh loops share: settings, catalog, calibration, the gateway's jobs and the
cluster's GPUs."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.advisor.cluster_inventory import LatestInventory
from services.advisor.gateway_jobs import GatewayJobs
from services.advisor.settings import AdvisorSettings
from services.advisor.time_predictor import Calibration, load_calibration
from services.common.gpu_catalog import GpuCatalog, load_catalog
from swapline.jobs.v1 import jobs_pb2_grpc


@dataclass(frozen=True)
class AdvisorState:
    settings: AdvisorSettings
    catalog: GpuCatalog
    calibration: Calibration
    jobs: GatewayJobs
    # Filled by cluster_nodes.refresh_cluster_forever where SWAPLINE_ADVISOR_CLUSTER_NODES reads the cluster.
    cluster: LatestInventory = field(default_factory=lambda: LatestInventory(enabled=False))

    @classmethod
    def from_settings(cls, settings: AdvisorSettings, stub: jobs_pb2_grpc.JobServiceStub) -> AdvisorState:
        """Reads catalog and calibration at start, so a bad override stops the pod instead of every call."""
        return cls(
            settings=settings,
            catalog=load_catalog(settings.catalog_path),
            calibration=load_calibration(settings.calibration_path),
            jobs=GatewayJobs(stub),
            cluster=LatestInventory(enabled=settings.cluster_nodes != "off"),
        )

    def job_limit(self, requested: int) -> int:
        return requested if requested > 0 else self.settings.default_job_limit

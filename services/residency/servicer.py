"""ModelResidencyService over gRPC: thin, over ModelResidency."""

from __future__ import annotations

import grpc

from services.common.grpc_server import ServiceBinding
from services.residency.model_residency import ModelResidency
from swapline.residency.v1 import residency_pb2, residency_pb2_grpc

SERVICE_NAME = residency_pb2.DESCRIPTOR.services_by_name["ModelResidencyService"].full_name


class ModelResidencyServicer(residency_pb2_grpc.ModelResidencyServiceServicer):
    def __init__(self, residency: ModelResidency) -> None:
        self.residency = residency

    async def EnsureLoaded(
        self, request: residency_pb2.EnsureLoadedRequest, context: grpc.aio.ServicerContext
    ) -> residency_pb2.EnsureLoadedResponse:
        outcome = await self.residency.ensure_loaded(list(request.models))
        return residency_pb2.EnsureLoadedResponse(loaded=outcome.loaded, unloaded=outcome.unloaded)

    async def ListResident(
        self, request: residency_pb2.ListResidentRequest, context: grpc.aio.ServicerContext
    ) -> residency_pb2.ListResidentResponse:
        residency = self.residency.residency()
        return residency_pb2.ListResidentResponse(
            models=[
                residency_pb2.ResidentModel(
                    name=model.footprint.name,
                    bytes=model.footprint.bytes,
                    measured=model.footprint.measured,
                    pinned=model.pinned,
                )
                for model in residency.models
            ],
            budget_bytes=residency.budget_bytes or 0,
            resident_bytes=residency.resident_bytes,
        )


def residency_binding(residency: ModelResidency) -> ServiceBinding:
    return ServiceBinding(
        ModelResidencyServicer(residency), residency_pb2_grpc.add_ModelResidencyServiceServicer_to_server, SERVICE_NAME
    )

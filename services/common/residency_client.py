"""The typed client of a Triton server's ModelResidencyService: what workers and detectors call before they
run a job's models on that server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from services.common.errors import from_rpc_error
from swapline.residency.v1 import residency_pb2, residency_pb2_grpc

# A call may wait behind other jobs' loads (one server loads one model at a time) and its own.
DEFAULT_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class LoadOutcome:
    loaded: tuple[str, ...]
    # Unloaded to make room, least recently used first.
    unloaded: tuple[str, ...]


class ResidencyClient:
    """Over a channel opened with services.common.grpc_channel.open_channel to the residency service."""

    def __init__(self, channel: grpc.aio.Channel, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._stub = residency_pb2_grpc.ModelResidencyServiceStub(channel)
        self.timeout_seconds = timeout_seconds

    async def ensure_loaded(self, models: Sequence[str]) -> LoadOutcome:
        """Returns once every model is ready on the server. Raises the domain error of the service's status:
        ResourceExhausted (over budget: the message names the models and bytes; or room only after running
        jobs end, which is retryable), NotFound for a model the repository lacks."""
        request = residency_pb2.EnsureLoadedRequest(models=list(models))
        try:
            response = await self._stub.EnsureLoaded(request, timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return LoadOutcome(tuple(response.loaded), tuple(response.unloaded))

"""`python -m services.residency`: the ModelResidencyService of one Triton server on SWAPLINE_RESIDENCY_* settings."""

from __future__ import annotations

import asyncio

from services.common.grpc_server import configure_logging, serve
from services.common.settings_check import service_settings
from services.residency.gpu_memory import gpu_memory_reader
from services.residency.model_residency import ModelResidency
from services.residency.servicer import residency_binding
from services.residency.settings import ENV_PREFIX, ResidencySettings
from services.residency.triton_repository import TritonModelRepository

SERVICE_NAME = "residency"


async def run(settings: ResidencySettings) -> None:
    configure_logging(settings.log_level)
    # NVML is opened only where a budget is set: without one nothing is measured.
    memory = gpu_memory_reader(settings.gpu_index) if settings.memory_budget_bytes else None
    # Created inside the running loop: the aio channel belongs to the loop that opens it.
    repository = TritonModelRepository(settings.triton_url, settings.triton_timeout_seconds)
    try:
        residency = ModelResidency(
            repository,
            settings.model_repository,
            memory,
            settings.memory_budget_bytes,
            settings.pinned_models,
            settings.busy_seconds,
        )
        await repository.wait_until_serving(settings.startup_timeout_seconds)
        await residency.start()
        await serve(settings, [residency_binding(residency)], SERVICE_NAME)
    finally:
        await repository.close()
        if memory is not None:
            memory.close()


def main() -> None:
    asyncio.run(run(service_settings("residency", ResidencySettings, ENV_PREFIX)))


if __name__ == "__main__":
    main()

"""Residency settings, read from SWAPLINE_RESIDENCY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged
from services.common.torch_catalog import BUILT_IN_FACTORIES

ENV_PREFIX = "SWAPLINE_RESIDENCY_"
# The built-in set: every model the repository serves without anything imported.
BUILT_IN_MODELS: tuple[str, ...] = tuple(BUILT_IN_FACTORIES)
MAX_PINNED_MODELS = 256


@dataclass(frozen=True, kw_only=True)
class ResidencySettings(ServerSettings):
    # The one Triton server whose models this service loads and unloads.
    triton_url: str = "127.0.0.1:8001"
    # Per repository call: a load may read an engine cache or build an embedded twin's session.
    triton_timeout_seconds: float = ranged(300.0, gt=0.0, le=3600.0)
    # How long the start waits for Triton to answer before the pinned models are loaded.
    startup_timeout_seconds: float = ranged(300.0, gt=0.0, le=3600.0)
    # The repository Triton serves, as this process sees it: models never loaded yet are estimated
    # from their files here.
    model_repository: Path = Path("triton_models")
    # GPU memory the models of this Triton server may hold together, in bytes; 0: no budget. Without a
    # GPU (NVML unreadable) the check is off whatever this says.
    memory_budget_bytes: int = ranged(0, ge=0, le=2**50)
    # The GPU (NVML index) this Triton server runs its models on: its used memory measures each load.
    gpu_index: int = ranged(0, ge=0, le=63)
    # Loaded at start and never unloaded: the built-in set by default; a deployment adds the models of
    # the sets it marks default. Names the repository lacks are skipped with a warning.
    pinned_models: tuple[str, ...] = ranged(BUILT_IN_MODELS, max_length=MAX_PINNED_MODELS)
    # A model a job asked for within this many seconds is not unloaded to make room for another job's:
    # that job is still running on it. The other request fails as RESOURCE_EXHAUSTED, which is retried.
    busy_seconds: float = ranged(30.0, ge=0.0, le=3600.0)

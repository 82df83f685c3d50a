"""Worker settings, read from SWAPLINE_WORKER_* environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged

SETTINGS_PREFIX = "SWAPLINE_WORKER_"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(ServerSettings):
    gateway_target: str
    decoder_target: str
    detector_target: str
    encoder_target: str
    triton_url: str
    worker_id: str = ranged(default_factory=default_worker_id, max_length=253)
    # Chunks in flight per process; more than one overlaps one chunk's waits with another's work.
    concurrency: int = ranged(1, ge=1, le=64)
    # Frames per decoded batch: the unit that moves through the pipeline's stages.
    batch_size: int = ranged(8, ge=1, le=256)
    # Frames are shrunk so their long side is at most this before detection; faces are scaled back.
    detect_max_side: int = ranged(640, ge=32, le=8192)
    # Smallest face side in full-frame pixels; 0 keeps the detector's default.
    min_face_size: int = ranged(0, ge=0, le=8192)
    heartbeat_seconds: float = ranged(5.0, gt=0.0, le=600.0)
    triton_timeout_seconds: float = ranged(60.0, gt=0.0)
    # Tensors to and from Triton through shared memory instead of the gRPC payload: only where
    # tritonserver shares this process's /dev/shm (the embedded stack); otherwise it turns itself off.
    triton_shared_memory: bool = False
    lease_wait_seconds: float = ranged(10.0, ge=0.0, le=60.0)

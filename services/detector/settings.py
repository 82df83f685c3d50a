"""Detector settings, read from SWAPLINE_DETECTOR_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, fields

from services.common.server_settings import ServerSettings
from services.common.settings_loader import ranged
from services.detector.detector_choice import CascadeMode
from services.detector.face_detector import DetectionDefaults

ENV_PREFIX = "SWAPLINE_DETECTOR_"


@dataclass(frozen=True, kw_only=True)
class DetectorSettings(ServerSettings):
    triton_url: str = "127.0.0.1:8001"
    triton_timeout_seconds: float = ranged(30.0, gt=0.0)
    # Tensors to and from Triton through shared memory instead of the gRPC payload: only where
    # tritonserver shares this process's /dev/shm (the embedded stack); otherwise it turns itself off.
    triton_shared_memory: bool = False
    # The whole cascade in one model (mtcnn_cascade) where Triton serves it: "auto" takes it when it is
    # ready, "on" requires it, "off" always sends the three stages apart (detector_choice).
    cascade: CascadeMode = "auto"
    # In pixels of the frames the detector is given (the worker sends a downscaled copy).
    min_face_size: int = ranged(DetectionDefaults.min_face_size, ge=1, le=8192)
    # Cascade thresholds of the original MTCNN; min_score is the final (O-Net) one.
    pnet_score: float = ranged(DetectionDefaults.pnet_score, ge=0.0, le=1.0)
    rnet_score: float = ranged(DetectionDefaults.rnet_score, ge=0.0, le=1.0)
    min_score: float = ranged(DetectionDefaults.min_score, ge=0.0, le=1.0)
    scale_factor: float = ranged(DetectionDefaults.scale_factor, gt=0.1, le=0.95)

    def detection_defaults(self) -> DetectionDefaults:
        return DetectionDefaults(**{field.name: getattr(self, field.name) for field in fields(DetectionDefaults)})

"""Detector settings, read from SWAPLINE_DETECTOR_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, fields

from services.common.server_settings import ServerSettings
from services.detector.face_detector import DetectionDefaults

ENV_PREFIX = "SWAPLINE_DETECTOR_"


@dataclass(frozen=True, kw_only=True)
class DetectorSettings(ServerSettings):
    triton_url: str = "127.0.0.1:8001"
    triton_timeout_seconds: float = 30.0
    # Tensors to and from Triton through shared memory instead of the gRPC payload: only where
    # tritonserver shares this process's /dev/shm (the embedded stack); otherwise it turns itself off.
    triton_shared_memory: bool = False
    # In pixels of the frames the detector is given (the worker sends a downscaled copy).
    min_face_size: int = DetectionDefaults.min_face_size
    # Cascade thresholds of the original MTCNN; min_score is the final (O-Net) one.
    pnet_score: float = DetectionDefaults.pnet_score
    rnet_score: float = DetectionDefaults.rnet_score
    min_score: float = DetectionDefaults.min_score
    scale_factor: float = DetectionDefaults.scale_factor

    def detection_defaults(self) -> DetectionDefaults:
        return DetectionDefaults(**{field.name: getattr(self, field.name) for field in fields(DetectionDefaults)})

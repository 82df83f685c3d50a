"""Detector settings, read from SWAPLINE_DETECTOR_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.server_settings import ServerSettings
from services.detector.face_detector import DetectionDefaults

ENV_PREFIX = "SWAPLINE_DETECTOR_"


@dataclass(frozen=True, kw_only=True)
class DetectorSettings(ServerSettings):
    triton_url: str = "127.0.0.1:8001"
    triton_timeout_seconds: float = 30.0
    # In pixels of the frames the detector is given (the worker sends a downscaled copy).
    min_face_size: int = 20
    # Cascade thresholds of the original MTCNN; min_score is the final (O-Net) one.
    pnet_score: float = 0.6
    rnet_score: float = 0.7
    min_score: float = 0.7
    scale_factor: float = 0.709

    def detection_defaults(self) -> DetectionDefaults:
        return DetectionDefaults(
            min_face_size=self.min_face_size,
            pnet_score=self.pnet_score,
            rnet_score=self.rnet_score,
            min_score=self.min_score,
            scale_factor=self.scale_factor,
        )

"""Which detector the service runs: the whole cascade in one model where Triton serves mtcnn_cascade,
or the per-stage FaceDetector.

The choice is asked of Triton at start-up and, while Triton has not answered, again on each request:
in the embedded stack and in a cluster Triton may still be loading when the detector starts. Once
Triton answers, the choice holds for the life of the process.
- "off": always per stage; Triton is not asked.
- "on": the cascade or nothing. Until mtcnn_cascade is ready, requests fail as Unavailable (Triton
  not answering, so retried) or FailedPrecondition (Triton serves P-Net but not the cascade).
- "auto": the cascade when it is ready, per stage once Triton answers that P-Net is ready without
  it. A request that comes before Triton answers goes per stage, which fails it as Unavailable as
  it fails requests in any Triton outage.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from typing import Literal, Protocol

from services.common.errors import FailedPrecondition, Unavailable
from services.common.face_types import DetectedFace
from services.common.model_runner import ModelRunner
from services.common.triton_client import TritonClient
from services.detector.face_detector import (
    CASCADE_MODEL,
    PNET_MODEL,
    CascadeFaceDetector,
    DetectionDefaults,
    Detector,
    FaceDetector,
    Frames,
)

log = logging.getLogger(__name__)

CascadeMode = Literal["auto", "on", "off"]
CASCADE_MODES: tuple[CascadeMode, ...] = typing.get_args(CascadeMode)


class ReadinessProbe(Protocol):
    async def is_model_ready(self, model: str) -> bool: ...


class TritonReadinessProbe:
    """Asks Triton on a channel of its own, opened for each question and closed after it.

    While Triton is still starting, each question is refused, and a channel refused backs off before it
    tries again (up to RECONNECT_BACKOFF_MS). Asked on the detector's own channel, that backoff outlived
    Triton's start, and the first job after `swapline up` failed as Unavailable; a channel per question
    leaves the detector's channel untried until its first request.
    """

    def __init__(self, url: str, timeout_seconds: float) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds

    async def is_model_ready(self, model: str) -> bool:
        client = TritonClient(self.url, self.timeout_seconds)
        try:
            return await client.is_model_ready(model)
        finally:
            await client.close()


class ChosenDetector:
    def __init__(
        self, runner: ModelRunner, probe: ReadinessProbe, mode: CascadeMode, defaults: DetectionDefaults | None = None
    ) -> None:
        self.probe = probe
        self.mode = mode
        self.per_stage = FaceDetector(runner, defaults)
        self.cascade = CascadeFaceDetector(runner, defaults)
        self.chosen: Detector | None = self.per_stage if mode == "off" else None
        self._lock = asyncio.Lock()

    async def choose(self) -> Detector | None:
        """The detector, once Triton has answered for one; None while it has not."""
        if self.chosen is not None:
            return self.chosen
        async with self._lock:
            if self.chosen is None:
                if await self.probe.is_model_ready(CASCADE_MODEL):
                    self.chosen = self.cascade
                    log.info("detecting with %s: the whole cascade in one model", CASCADE_MODEL)
                elif self.mode == "auto" and await self.probe.is_model_ready(PNET_MODEL):
                    self.chosen = self.per_stage
                    log.info("Triton serves no %s: detecting per stage", CASCADE_MODEL)
            return self.chosen

    async def detect(
        self, frames: Frames, min_face_size: int | None = None, min_score: float | None = None
    ) -> list[list[DetectedFace]]:
        detector = await self.choose()
        if detector is None:
            detector = await self._undecided()
        return await detector.detect(frames, min_face_size=min_face_size, min_score=min_score)

    async def _undecided(self) -> Detector:
        if self.mode == "auto":
            return self.per_stage
        if await self.probe.is_model_ready(PNET_MODEL):
            raise FailedPrecondition(
                f"model {CASCADE_MODEL} is not served by Triton, and SWAPLINE_DETECTOR_CASCADE=on requires it"
            )
        raise Unavailable(f"model {CASCADE_MODEL} is not ready: Triton does not answer yet")

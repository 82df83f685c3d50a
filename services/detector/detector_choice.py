"""Which detector the service runs: for a request naming an imported FaceFusion detector, that model;
otherwise the built-in MTCNN, as the whole cascade in one model where Triton serves mtcnn_cascade, or
the per-stage FaceDetector.

An imported detector is made once per name, on the first request that names it, after Triton says the
model is ready and which outputs it serves (FaceFusion's files name them only by position). An unknown
name is InvalidArgument naming the choices; a known one Triton does not serve is FailedPrecondition.

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
from typing import Literal, NoReturn, Protocol, runtime_checkable

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.face_detector_models import DETECTOR_MODELS
from services.common.face_model_catalog import BUILT_IN_DETECTOR, DETECTOR_NAMES
from services.common.face_types import DetectedFace
from services.common.model_runner import ModelCatalog, ModelRunner
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
from services.detector.imported_detector import ImportedFaceDetector

log = logging.getLogger(__name__)

CascadeMode = Literal["auto", "on", "off"]
CASCADE_MODES: tuple[CascadeMode, ...] = typing.get_args(CascadeMode)


class ReadinessProbe(Protocol):
    async def is_model_ready(self, model: str) -> bool: ...


@runtime_checkable
class DetectorSet(Protocol):
    """Detectors by the model a request names (DetectRequest.model)."""

    async def for_model(self, model: str) -> Detector: ...


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

    async def output_names(self, model: str) -> tuple[str, ...]:
        client = TritonClient(self.url, self.timeout_seconds)
        try:
            return await client.output_names(model)
        finally:
            await client.close()


class ChosenDetector:
    """`outputs` reads an imported model's output names; where None, the probe does when it can
    (TritonReadinessProbe does)."""

    def __init__(
        self,
        runner: ModelRunner,
        probe: ReadinessProbe,
        mode: CascadeMode,
        defaults: DetectionDefaults | None = None,
        outputs: ModelCatalog | None = None,
    ) -> None:
        self.runner = runner
        self.probe = probe
        self.outputs = outputs if outputs is not None or not isinstance(probe, ModelCatalog) else probe
        self.mode = mode
        self.imported: dict[str, ImportedFaceDetector] = {}
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
        """The built-in MTCNN's faces."""
        detector = await self.choose()
        if detector is None:
            detector = await self._undecided()
        return await detector.detect(frames, min_face_size=min_face_size, min_score=min_score)

    async def for_model(self, model: str) -> Detector:
        """The detector a request names: empty (or the built-in's name) is MTCNN, else an imported model."""
        if not model or model == BUILT_IN_DETECTOR:
            return self
        spec = DETECTOR_MODELS.get(model)
        if spec is None:
            raise InvalidArgument(f"detector model {model[:64]!r} is not one of {', '.join(DETECTOR_NAMES)}")
        detector = self.imported.get(model)
        if detector is not None:
            return detector
        async with self._lock:
            if model not in self.imported:
                if not await self.probe.is_model_ready(model):
                    await self._fail_unserved(model)
                if self.outputs is None:
                    raise FailedPrecondition(f"detector model {model}: this detector cannot read its outputs")
                names = await self.outputs.output_names(model)
                self.imported[model] = ImportedFaceDetector(self.runner, spec, names)
                log.info("detecting with imported model %s", model)
            return self.imported[model]

    async def _fail_unserved(self, model: str) -> NoReturn:
        """Not ready: not installed where Triton serves the built-in models, else Triton is not answering yet."""
        if await self.probe.is_model_ready(CASCADE_MODEL) or await self.probe.is_model_ready(PNET_MODEL):
            raise FailedPrecondition(f"detector model {model} is not installed; `swapline models import` installs it")
        raise Unavailable(f"detector model {model} is not ready: Triton does not answer yet")

    async def _undecided(self) -> Detector:
        if self.mode == "auto":
            return self.per_stage
        if await self.probe.is_model_ready(PNET_MODEL):
            raise FailedPrecondition(
                f"model {CASCADE_MODEL} is not served by Triton, and SWAPLINE_DETECTOR_CASCADE=on requires it"
            )
        raise Unavailable(f"model {CASCADE_MODEL} is not ready: Triton does not answer yet")

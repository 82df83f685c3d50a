"""DetectorService over gRPC: FrameBatch in (parsed by frame_streams.register_detector), per-frame faces out.

A request's `model` picks the detector where the service has a choice of them (ChosenDetector); a
service given one detector serves the built-in model only.
"""

from __future__ import annotations

import grpc

from services.common.errors import InvalidArgument
from services.common.face_types import frames_faces_to_proto
from services.common.frames.frame_codec import unpack_rgb_frames
from services.common.frames.frame_streams import DetectFrames, register_detector
from services.common.frames.frame_wire import FrameBatchView
from services.common.grpc_server import ServiceBinding
from services.detector.detector_choice import DetectorSet
from services.detector.face_detector import Detector
from services.detector.imported_detector import REQUEST_FALLBACKS, FallbackTally
from swapline.detector.v1 import detector_pb2, detector_pb2_grpc

SERVICE_NAME = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name


class DetectorServicer(detector_pb2_grpc.DetectorServiceServicer):
    def __init__(self, detector: Detector | DetectorSet) -> None:
        self.detector = detector

    async def Detect(
        self, request: DetectFrames[FrameBatchView], context: grpc.aio.ServicerContext
    ) -> detector_pb2.DetectResponse:
        options = request.options
        if options.min_face_size < 0:
            raise InvalidArgument(f"min_face_size {options.min_face_size} is negative")
        if options.min_score < 0:
            raise InvalidArgument(f"min_score {options.min_score} is negative")
        detector = await self._for_model(options.model)
        frames, indices, _ = unpack_rgb_frames(request.frames)
        tally = FallbackTally()
        token = REQUEST_FALLBACKS.set(tally)
        try:
            faces = await detector.detect(
                frames, min_face_size=options.min_face_size or None, min_score=options.min_score or None
            )
        finally:
            REQUEST_FALLBACKS.reset(token)
        return detector_pb2.DetectResponse(frames=frames_faces_to_proto(indices, faces), fp32_fallbacks=tally.count)

    async def _for_model(self, model: str) -> Detector:
        if isinstance(self.detector, DetectorSet):
            return await self.detector.for_model(model)
        if model:
            raise InvalidArgument(f"detector model {model[:64]!r}: this detector serves the built-in model only")
        return self.detector


def detector_binding(detector: Detector | DetectorSet) -> ServiceBinding:
    return ServiceBinding(DetectorServicer(detector), register_detector, SERVICE_NAME)

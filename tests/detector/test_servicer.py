from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest

from services.common.face_types import frames_faces_from_proto
from services.common.frames.frame_codec import pack_frames
from services.common.grpc_server import server_options, start_server
from services.detector.face_detector import CASCADE_OPTIONS, CascadeFaceDetector, Detector, FaceDetector
from services.detector.servicer import detector_binding
from services.detector.settings import DetectorSettings
from services.model_build.mtcnn_cascade import MtcnnCascade
from services.triton.local_models import LocalModels
from swapline.common.v1 import common_pb2
from swapline.detector.v1 import detector_pb2, detector_pb2_grpc
from tests.detector.conftest import BACKGROUND, CascadeRunner

Call = Callable[[detector_pb2_grpc.DetectorServiceStub], Awaitable[detector_pb2.DetectResponse]]


def call_detector(
    local_models: LocalModels, call: Call, detector: Detector | None = None
) -> detector_pb2.DetectResponse:
    """Serves the detector (default: per stage) over real gRPC on a free loopback port, with LocalModels
    in Triton's place."""

    async def run() -> detector_pb2.DetectResponse:
        settings = DetectorSettings(port=0, transport_security="plaintext", auth_mode="open")
        running = await start_server(settings, [detector_binding(detector or FaceDetector(local_models))])
        try:
            options = server_options(settings)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
                return await call(detector_pb2_grpc.DetectorServiceStub(channel))
        finally:
            await running.server.stop(None)

    return asyncio.run(run())


def status_of(local_models: LocalModels, request: detector_pb2.DetectRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call_detector(local_models, lambda stub: stub.Detect(request))
    return caught.value.code(), caught.value.details() or ""


def test_detect_returns_faces_per_frame_index(local_models: LocalModels, side_by_side: np.ndarray) -> None:
    frames = np.stack([side_by_side, np.full_like(side_by_side, BACKGROUND)])
    request = detector_pb2.DetectRequest(frames=pack_frames(frames, [17, 18]))
    response = call_detector(local_models, lambda stub: stub.Detect(request))
    assert [message.frame_index for message in response.frames] == [17, 18]
    faces = frames_faces_from_proto(response.frames)
    assert [len(frame_faces) for frame_faces in faces] == [2, 0]
    assert all(face.score >= 0.7 and face.landmarks.shape == (5, 2) for face in faces[0])


def test_the_cascade_detector_answers_through_the_service(
    local_models: LocalModels, cascade_module: MtcnnCascade, side_by_side: np.ndarray
) -> None:
    frames = np.stack([side_by_side, np.full_like(side_by_side, BACKGROUND)])
    request = detector_pb2.DetectRequest(frames=pack_frames(frames, [3, 4]), min_score=0.9)
    runner = CascadeRunner(cascade_module)
    response = call_detector(local_models, lambda stub: stub.Detect(request), CascadeFaceDetector(runner))
    assert [len(message.faces) for message in response.frames] == [2, 0]
    ((_, inputs),) = runner.requests
    assert inputs["options"][:, CASCADE_OPTIONS.index("min_score")].tolist() == [np.float32(0.9)] * 2


def test_request_thresholds_reach_the_detector(local_models: LocalModels, side_by_side: np.ndarray) -> None:
    request = detector_pb2.DetectRequest(frames=pack_frames(side_by_side[None], [0]), min_face_size=300)
    response = call_detector(local_models, lambda stub: stub.Detect(request))
    assert [len(message.faces) for message in response.frames] == [0]


def test_empty_batch_has_empty_answer(local_models: LocalModels) -> None:
    request = detector_pb2.DetectRequest(frames=common_pb2.FrameBatch(width=640, height=360))
    response = call_detector(local_models, lambda stub: stub.Detect(request))
    assert list(response.frames) == []


def test_wrong_byte_count_is_invalid_argument(local_models: LocalModels) -> None:
    batch = common_pb2.FrameBatch(width=64, height=48)
    batch.frames.add(index=0, pixels=b"\0" * (64 * 48 * 3 - 1))
    code, details = status_of(local_models, detector_pb2.DetectRequest(frames=batch))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected 9216" in details


@pytest.mark.parametrize(
    ("field", "value", "message"), [("min_face_size", -1, "min_face_size -1"), ("min_score", -0.5, "min_score -0.5")]
)
def test_negative_thresholds_are_invalid_argument(
    local_models: LocalModels, field: str, value: float, message: str
) -> None:
    request = detector_pb2.DetectRequest(frames=pack_frames(np.zeros((1, 48, 64, 3), np.uint8), [0]))
    setattr(request, field, value)
    code, details = status_of(local_models, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details

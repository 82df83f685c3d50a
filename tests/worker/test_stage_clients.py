from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from services.common.errors import (
    RETRYABLE_CODES,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    SwaplineError,
    Unavailable,
)
from services.common.face_types import DetectedFace, frames_faces_to_proto
from services.common.frames.frame_codec import pack_frames, unpack_frames
from services.common.frames.frame_streams import decoder_stub, detector_stub, encoder_stub
from services.worker.stage_clients import (
    DecoderFrameSource,
    DetectorFaceFinder,
    EncoderSegmentSink,
    detection_size,
    encoder_stream_error,
    stage_error,
)
from swapline.common.v1 import common_pb2
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from swapline.detector.v1 import detector_pb2, detector_pb2_grpc
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from tests.worker.aio_serving import serving

TIMEOUT_SECONDS = 10.0


def test_detection_size_caps_the_long_side() -> None:
    assert detection_size(1920, 1080, 640) == (640, 360)
    assert detection_size(720, 1280, 640) == (360, 640)
    assert detection_size(320, 240, 640) == (320, 240)


class _Detector(detector_pb2_grpc.DetectorServiceServicer):
    def __init__(self) -> None:
        self.requests: list[detector_pb2.DetectRequest] = []

    async def Detect(self, request: detector_pb2.DetectRequest, context: Any) -> detector_pb2.DetectResponse:
        self.requests.append(request)
        width, height = request.frames.width, request.frames.height
        # One face in the middle of frame 1 only, in the given (downscaled) pixels.
        points = np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.42, 0.6], [0.58, 0.6]], np.float32)
        face = DetectedFace(
            box=(0.3 * width, 0.3 * height, 0.7 * width, 0.7 * height),
            score=0.9,
            landmarks=points * np.array([width, height], np.float32),
        )
        return detector_pb2.DetectResponse(frames=frames_faces_to_proto([1], [[face]]))


class _Decoder(decoder_pb2_grpc.DecoderServiceServicer):
    async def Decode(self, request: decoder_pb2.DecodeRequest, context: Any) -> AsyncIterator[common_pb2.FrameBatch]:
        for start in range(request.start_frame, request.start_frame + request.frame_count, request.batch_size):
            indices = list(range(start, min(start + request.batch_size, request.start_frame + request.frame_count)))
            # What the request asks for: 6x4 pictures as RGB, or as NV12 (six rows of six bytes).
            shape = (6, 6) if request.pixel_format == common_pb2.PIXEL_FORMAT_NV12 else (4, 6, 3)
            frames = np.stack([np.full(shape, index, np.uint8) for index in indices])
            yield pack_frames(frames, indices)
        if request.uri == "truncated.mp4":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "video ends early")


class _Encoder(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, fail_after: int | None = None) -> None:
        self.header: encoder_pb2.SegmentHeader | None = None
        self.indices: list[int] = []
        self._fail_after = fail_after

    async def EncodeSegment(self, requests: Any, context: Any) -> encoder_pb2.EncodeSegmentResponse:
        async for request in requests:
            if request.HasField("header"):
                self.header = request.header
                continue
            _, indices, _ = unpack_frames(request.frames)
            self.indices.extend(indices)
            if self._fail_after is not None and len(self.indices) >= self._fail_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "encoder disk gone")
        assert self.header is not None
        return encoder_pb2.EncodeSegmentResponse(output_uri=self.header.output_uri, frames=len(self.indices))


def test_detector_finder_downscales_and_scales_faces_back() -> None:
    detector = _Detector()

    async def body(channel: grpc.aio.Channel) -> list[list[DetectedFace]]:
        finder = DetectorFaceFinder(detector_stub(channel), 320, 40, TIMEOUT_SECONDS)
        return await finder.detect(np.zeros((2, 480, 1280, 3), np.uint8))

    found = asyncio.run(serving(lambda s: detector_pb2_grpc.add_DetectorServiceServicer_to_server(detector, s), body))
    request = detector.requests[0]
    assert (request.frames.width, request.frames.height) == (320, 120)
    assert request.min_face_size == 10
    assert request.model == ""
    assert found[0] == []
    (face,) = found[1]
    np.testing.assert_allclose(face.box, (0.3 * 1280, 0.3 * 480, 0.7 * 1280, 0.7 * 480), rtol=1e-5)
    np.testing.assert_allclose(face.landmarks[2], (0.5 * 1280, 0.5 * 480), rtol=1e-5)


def test_detector_finder_asks_for_the_jobs_detector_model() -> None:
    detector = _Detector()

    async def body(channel: grpc.aio.Channel) -> list[list[DetectedFace]]:
        finder = DetectorFaceFinder(detector_stub(channel), 320, 0, TIMEOUT_SECONDS, model="scrfd_2.5g")
        return await finder.detect(np.zeros((2, 480, 1280, 3), np.uint8))

    asyncio.run(serving(lambda s: detector_pb2_grpc.add_DetectorServiceServicer_to_server(detector, s), body))
    assert detector.requests[0].model == "scrfd_2.5g"


def test_detector_finder_sends_what_its_shrink_makes() -> None:
    detector = _Detector()
    asked: list[tuple[tuple[int, ...], tuple[int, int]]] = []

    def shrink(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        asked.append((frames.shape, size))
        return np.full((len(frames), size[1], size[0], 3), 7, np.uint8)

    async def body(channel: grpc.aio.Channel) -> list[list[DetectedFace]]:
        finder = DetectorFaceFinder(detector_stub(channel), 320, 0, TIMEOUT_SECONDS, shrink)
        return await finder.detect(np.zeros((2, 480, 1280, 3), np.uint8))

    asyncio.run(serving(lambda s: detector_pb2_grpc.add_DetectorServiceServicer_to_server(detector, s), body))
    assert asked == [((2, 480, 1280, 3), (320, 120))]
    sent, _, _ = unpack_frames(detector.requests[0].frames)
    assert sent.shape == (2, 120, 320, 3) and bool((sent == 7).all())


def test_decoder_source_streams_batches_and_maps_errors() -> None:
    async def body(channel: grpc.aio.Channel) -> list[list[int]]:
        stub = decoder_stub(channel)
        batches = []
        async for frames, indices in DecoderFrameSource(stub, "clip.mp4", 10, 0, 5, 2, TIMEOUT_SECONDS):
            assert [int(frame[0, 0, 0]) for frame in frames] == list(indices)
            batches.append(list(indices))
        with pytest.raises(InvalidArgument, match="ends early"):
            async for _ in DecoderFrameSource(stub, "truncated.mp4", 0, 0, 2, 2, TIMEOUT_SECONDS):
                pass
        return batches

    batches = asyncio.run(serving(lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(_Decoder(), s), body))
    assert batches == [[10, 11], [12, 13], [14]]


def test_decoder_source_asks_for_the_workers_pixel_format() -> None:
    async def body(channel: grpc.aio.Channel) -> list[tuple[int, ...]]:
        source = DecoderFrameSource(decoder_stub(channel), "clip.mp4", 0, 0, 3, 2, TIMEOUT_SECONDS, "nv12")
        return [frames.shape async for frames, _ in source]

    shapes = asyncio.run(serving(lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(_Decoder(), s), body))
    assert shapes == [(2, 6, 6), (1, 6, 6)]


def test_detector_finder_shrinks_nv12_frames_by_their_picture_size() -> None:
    detector = _Detector()
    asked: list[tuple[tuple[int, ...], tuple[int, int]]] = []

    def shrink(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        asked.append((frames.shape, size))
        return np.zeros((len(frames), size[1], size[0], 3), np.uint8)

    async def body(channel: grpc.aio.Channel) -> list[list[DetectedFace]]:
        finder = DetectorFaceFinder(detector_stub(channel), 320, 40, TIMEOUT_SECONDS, shrink)
        return await finder.detect(np.zeros((2, 720, 1280), np.uint8))

    asyncio.run(serving(lambda s: detector_pb2_grpc.add_DetectorServiceServicer_to_server(detector, s), body))
    # 1280x480 NV12 is 720 rows: shrunk by its picture's width, and the smallest face with it.
    assert asked == [((2, 720, 1280), (320, 120))]
    assert detector.requests[0].min_face_size == 10


def _header() -> encoder_pb2.SegmentHeader:
    return encoder_pb2.SegmentHeader(output_uri="seg/0.mp4", fps=25, width=6, height=4)


def test_encoder_sink_sends_the_header_then_numbered_frames() -> None:
    encoder = _Encoder()

    async def body(channel: grpc.aio.Channel) -> int:
        async with EncoderSegmentSink(encoder_stub(channel), _header(), TIMEOUT_SECONDS, 100) as sink:
            for _ in range(3):
                await sink.write(np.zeros((2, 4, 6, 3), np.uint8))
            return await sink.close()

    written = asyncio.run(serving(lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(encoder, s), body))
    assert written == 6
    assert encoder.header is not None and encoder.header.output_uri == "seg/0.mp4"
    assert encoder.indices == list(range(100, 106))


def test_encoder_sink_surfaces_a_failed_stream_instead_of_blocking() -> None:
    encoder = _Encoder(fail_after=2)

    async def body(channel: grpc.aio.Channel) -> None:
        async with EncoderSegmentSink(encoder_stub(channel), _header(), TIMEOUT_SECONDS) as sink:
            for _ in range(50):
                await sink.write(np.zeros((2, 4, 6, 3), np.uint8))
            await sink.close()

    # The encoder's own status, or, when gRPC loses it to a send racing the end (grpc/grpc#36066),
    # the sink's retryable stand-in for it: never a non-retryable INTERNAL.
    with pytest.raises(Unavailable, match=r"disk gone|grpc/grpc#36066"):
        asyncio.run(serving(lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(encoder, s), body))


def _rpc_error(code: grpc.StatusCode, debug: str, details: str = "Internal error from Core") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug)


def test_a_send_failing_as_the_encoder_ends_the_stream_is_retryable() -> None:
    failed_send = 'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x1>,)'
    assert isinstance(encoder_stream_error("s.mp4", _rpc_error(grpc.StatusCode.INTERNAL, failed_send)), Unavailable)


def test_other_internal_errors_of_the_encoder_stay_internal() -> None:
    assert isinstance(encoder_stream_error("s.mp4", _rpc_error(grpc.StatusCode.INTERNAL, "crashed")), Internal)


StageCall = Callable[[grpc.aio.Channel, float], Coroutine[Any, Any, Any]]


async def _decode(channel: grpc.aio.Channel, timeout: float) -> list[list[int]]:
    source = DecoderFrameSource(decoder_stub(channel), "clip.mp4", 0, 0, 3, 2, timeout)
    return [list(indices) async for _, indices in source]


async def _detect(channel: grpc.aio.Channel, timeout: float) -> list[int]:
    finder = DetectorFaceFinder(detector_stub(channel), 640, 0, timeout)
    return [len(faces) for faces in await finder.detect(np.zeros((2, 48, 64, 3), np.uint8))]


async def _encode(channel: grpc.aio.Channel, timeout: float) -> int:
    async with EncoderSegmentSink(encoder_stub(channel), _header(), timeout) as sink:
        await sink.write(np.zeros((2, 4, 6, 3), np.uint8))
        return await sink.close()


STAGES: dict[str, tuple[Callable[[grpc.aio.Server], None], StageCall]] = {
    "decoder": (lambda server: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(_Decoder(), server), _decode),
    "detector": (lambda server: detector_pb2_grpc.add_DetectorServiceServicer_to_server(_Detector(), server), _detect),
    "encoder": (lambda server: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(_Encoder(), server), _encode),
}


async def _serve_at(address: str, register: Callable[[grpc.aio.Server], None]) -> grpc.aio.Server:
    server = grpc.aio.server()
    register(server)
    server.add_insecure_port(address)
    await server.start()
    return server


async def _until_a_connection_attempt_failed(channel: grpc.aio.Channel) -> None:
    """Returns once the channel has found nothing at its address: a call made before it is now waiting."""
    deadline = time.monotonic() + 10
    while channel.get_state() != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        assert time.monotonic() < deadline, "the channel never tried to connect"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_call_made_while_its_service_restarts_waits_for_it(stage: str, tmp_path: Path) -> None:
    register, call = STAGES[stage]
    address = f"unix:{tmp_path}/stage.sock"

    async def scenario() -> tuple[Any, Any]:
        server = await _serve_at(address, register)
        async with grpc.aio.insecure_channel(address) as channel:
            before = await call(channel, TIMEOUT_SECONDS)
            await server.stop(None)
            during_restart = asyncio.create_task(call(channel, TIMEOUT_SECONDS))
            await _until_a_connection_attempt_failed(channel)
            server = await _serve_at(address, register)
            try:
                return before, await during_restart
            finally:
                await server.stop(None)

    before, after = asyncio.run(scenario())
    assert after == before


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_service_down_past_the_deadline_fails_the_call_as_retryable(stage: str, tmp_path: Path) -> None:
    _, call = STAGES[stage]

    async def scenario() -> float:
        started = time.monotonic()
        async with grpc.aio.insecure_channel(f"unix:{tmp_path}/nobody.sock") as channel:
            with pytest.raises(SwaplineError) as caught:
                await call(channel, 0.5)
        assert caught.value.code in RETRYABLE_CODES
        assert stage in caught.value.message
        return time.monotonic() - started

    # It waited for the service (not refused at once), and not much past its deadline.
    assert 0.4 < asyncio.run(scenario()) < 5


class _DecoderThatDies(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self) -> None:
        self.first_sent = asyncio.Event()

    async def Decode(self, request: decoder_pb2.DecodeRequest, context: Any) -> AsyncIterator[common_pb2.FrameBatch]:
        yield pack_frames(np.zeros((1, 4, 6, 3), np.uint8), [0])
        self.first_sent.set()
        await asyncio.Event().wait()


def test_a_service_that_goes_away_mid_stream_fails_the_call_as_retryable(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/decoder.sock"

    async def scenario() -> None:
        decoder = _DecoderThatDies()
        server = await _serve_at(address, lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(decoder, s))
        async with grpc.aio.insecure_channel(address) as channel:
            batches = aiter(DecoderFrameSource(decoder_stub(channel), "clip.mp4", 0, 0, 5, 1, TIMEOUT_SECONDS))
            await anext(batches)
            await server.stop(None)
            await anext(batches)

    with pytest.raises(Unavailable, match="decoder"):
        asyncio.run(scenario())


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.CANCELLED, "Cancelled", Unavailable),
        (grpc.StatusCode.UNKNOWN, "Stream removed", Unavailable),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", Unavailable),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", DeadlineExceeded),
        (grpc.StatusCode.INVALID_ARGUMENT, "video ends early", InvalidArgument),
        (grpc.StatusCode.UNKNOWN, "Exception calling application: boom", Internal),
    ],
)
def test_stage_errors_are_retryable_when_the_connection_was_lost(
    code: grpc.StatusCode, details: str, expected: type[SwaplineError]
) -> None:
    error = stage_error("decoder", _rpc_error(code, "", details))
    assert type(error) is expected
    assert error.message.startswith("decoder: ")

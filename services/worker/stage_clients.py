"""The pipeline's Protocols over the decoder, detector and encoder services (gRPC clients).

Downstream failures arrive as grpc.aio.AioRpcError and leave as domain errors (stage_error), so the
lease loop can tell retryable failures (UNAVAILABLE, ...) from bad input (INVALID_ARGUMENT).

Every call rides out a restart of its service: it is made with wait_for_ready, so while the service
is down it waits for the channel to connect again instead of failing at once, and each call has a
deadline (`timeout_seconds`): for a stream, the longest wait for its next message. A service that
stays down past it fails the chunk as retryable; so does one that goes away in the middle of a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from services.common.errors import DeadlineExceeded, Internal, SwaplineError, Unavailable, from_rpc_error
from services.common.face_types import DetectedFace, frames_faces_from_proto
from services.common.frames.frame_codec import Frames, outgoing_runs, received_frames, regroup_frames
from services.common.frames.frame_memory import FrameMemory, domain_from_metadata, new_tag
from services.common.frames.frame_streams import DetectFrames
from services.common.frames.frame_wire import FrameRun, OutgoingFrames
from services.common.frames.pixel_formats import PixelFormat, describe_frames, pixel_format_to_proto
from services.common.input_limits import excerpt
from services.worker.face_aligner import FrameShrinker, downscale_frames
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from swapline.detector.v1 import detector_pb2, detector_pb2_grpc
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc

SINK_QUEUE_SIZE = 2
# How grpc-python's debug string names a send that failed because the stream had ended.
_SEND_FAILED = "SendMessageOperation"
# How gRPC words a connection lost in the middle of a call, whatever status it gives it: the service
# went away (a crash, a restart), so the chunk may pass on another try.
_CONNECTION_LOST = ("stream removed", "socket closed", "connection reset", "rst_stream", "goaway", "broken pipe")


def stage_error(service: str, error: grpc.aio.AioRpcError) -> SwaplineError:
    """The domain error for a failed call to a stage service, named after the service.

    The service's own status passes on (bad input stays INVALID_ARGUMENT, an overloaded service
    RESOURCE_EXHAUSTED). A call that ended because the connection did (CANCELLED, which this worker
    sees only when the other end cancelled, or UNKNOWN and INTERNAL statuses that gRPC gives a lost
    connection) is Unavailable: retryable.
    """
    code = error.code()
    details = error.details() or code.name
    text = f"{details} ({error.debug_error_string() or ''})".lower()
    if code == grpc.StatusCode.CANCELLED or (
        code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and any(lost in text for lost in _CONNECTION_LOST)
    ):
        return Unavailable(f"{service}: the connection was lost during the call: {details}")
    domain = from_rpc_error(error)
    return type(domain)(f"{service}: {domain.message}")


class DecoderFrameSource:
    """Streams one frame range from DecoderService.Decode (frame_streams.decoder_stub) as (frames, indices) batches,
    asking for `pixel_format` (the decoder may answer RGB: the frames' shape says which they are).

    With a frame memory, the request names its domain and a tag for this call's files; a decoder that shares it
    sends batches there. A stream left before its end removes the files the decoder wrote for it.
    """

    def __init__(
        self,
        stub: decoder_pb2_grpc.DecoderServiceStub,
        uri: str,
        start_frame: int,
        seek_pts: int,
        frame_count: int,
        batch_size: int,
        timeout_seconds: float,
        pixel_format: PixelFormat = "rgb24",
        memory: FrameMemory | None = None,
    ) -> None:
        self._stub = stub
        self._timeout_seconds = timeout_seconds
        self._memory = memory
        self._request = decoder_pb2.DecodeRequest(
            uri=uri,
            start_frame=start_frame,
            seek_pts=seek_pts,
            frame_count=frame_count,
            batch_size=batch_size,
            pixel_format=pixel_format_to_proto(pixel_format),
            frame_memory_domain=memory.domain if memory is not None else "",
            frame_memory_tag=new_tag() if memory is not None else "",
        )

    async def __aiter__(self) -> AsyncIterator[tuple[Frames, Sequence[int]]]:
        async for frames, indices in regroup_frames(self._messages(), self._request.batch_size):
            yield frames, indices

    async def _messages(self) -> AsyncIterator[tuple[Frames, list[int]]]:
        call = self._stub.Decode(self._request, wait_for_ready=True)
        finished = False
        try:
            while True:
                try:
                    batch = await asyncio.wait_for(call.read(), self._timeout_seconds)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"decoder: no frames for {self._timeout_seconds:.0f} s ({excerpt(self._request.uri)})"
                    ) from None
                if batch is grpc.aio.EOF:
                    finished = True
                    return
                frames, indices, _ = received_frames(batch, self._memory)
                yield frames, indices
        except grpc.aio.AioRpcError as error:
            raise stage_error("decoder", error) from error
        finally:
            call.cancel()
            if self._memory is not None and not finished:
                self._memory.discard_tagged(self._request.frame_memory_tag)


def detection_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The (width, height) frames are shrunk to before detection: the long side at most max_side."""
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return width, height
    factor = max_side / longest
    return max(1, round(width * factor)), max(1, round(height * factor))


def scale_face(face: DetectedFace, scale_x: float, scale_y: float) -> DetectedFace:
    x1, y1, x2, y2 = face.box
    factors = np.array([scale_x, scale_y], np.float32)
    return DetectedFace(
        box=(x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y),
        score=face.score,
        landmarks=(face.landmarks * factors).astype(np.float32),
    )


class DetectorFaceFinder:
    """DetectorService.Detect (frame_streams.detector_stub) on a copy of the frames downscaled to max_side,
    faces scaled back.

    min_face_size is in full-frame pixels and scaled with the frames (0 keeps the detector's default).
    `shrink` makes the copy: OpenCV on the host, or the face warper's own where it keeps frames on a GPU.
    `model` names the job's detector (empty: the built-in MTCNN).
    """

    def __init__(
        self,
        stub: detector_pb2_grpc.DetectorServiceStub,
        max_side: int,
        min_face_size: int,
        timeout_seconds: float,
        shrink: FrameShrinker = downscale_frames,
        model: str = "",
    ) -> None:
        self._stub = stub
        self._model = model
        # Detector requests run again on an imported model's FP32 twin, as the detector answered.
        self.fp32_fallbacks = 0
        self._max_side = max_side
        self._min_face_size = min_face_size
        self._timeout_seconds = timeout_seconds
        self._shrink = shrink

    async def detect(self, frames: Frames) -> list[list[DetectedFace]]:
        count = len(frames)
        if count == 0:
            return []
        _, width, height = describe_frames(frames)
        small_width, small_height = detection_size(width, height, self._max_side)
        request = await asyncio.to_thread(self._request, frames, width, (small_width, small_height))
        try:
            response = await self._stub.Detect(request, timeout=self._timeout_seconds, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            raise stage_error("detector", error) from error
        self.fp32_fallbacks += response.fp32_fallbacks
        found: list[list[DetectedFace]] = [[] for _ in range(count)]
        scale_x, scale_y = width / small_width, height / small_height
        for message, faces in zip(response.frames, frames_faces_from_proto(response.frames), strict=True):
            if not 0 <= message.frame_index < count:
                raise Internal(f"detector answered for frame {message.frame_index} of a batch of {count}")
            found[message.frame_index] = [scale_face(face, scale_x, scale_y) for face in faces]
        return found

    def _request(self, frames: Frames, width: int, size: tuple[int, int]) -> DetectFrames[FrameRun]:
        small = self._shrink(frames, size)
        min_face = self._min_face_size
        if min_face > 0:
            min_face = max(1, round(min_face * size[0] / width))
        return DetectFrames(
            FrameRun(small, list(range(len(small)))),
            detector_pb2.DetectRequest(min_face_size=min_face, model=self._model),
        )


def encoder_stream_error(output_uri: str, error: grpc.aio.AioRpcError) -> Exception:
    """The domain error for a failed EncodeSegment stream."""
    if error.code() == grpc.StatusCode.INTERNAL and _SEND_FAILED in (error.debug_error_string() or ""):
        # grpc/grpc#36066: when the encoder ends the stream while a frame is being sent, grpc-python
        # may replace the encoder's status with this INTERNAL one from the failed send. The encoder
        # did end the stream early, so the chunk is retried instead of failing its job as a bug.
        return Unavailable(
            f"{excerpt(output_uri)}: the encoder ended the segment stream while frames were being sent; "
            "gRPC lost its status (grpc/grpc#36066)"
        )
    return stage_error("encoder", error)


class EncoderSegmentSink:
    """An EncoderService.EncodeSegment client stream (frame_streams.encoder_stub): the header, then FrameRuns.

    Use it as an async context manager: leaving the block without close() (an error, a
    cancellation) cancels the stream, so the encoder never finishes a partial segment.

    With a frame memory, batches go through it once the encoder's initial metadata has named the same domain;
    until then, or with an encoder that names none, they go in the messages. Whatever the stream ends with, the
    files it wrote that the encoder did not take are removed.
    """

    def __init__(
        self,
        stub: encoder_pb2_grpc.EncoderServiceStub,
        header: encoder_pb2.SegmentHeader,
        timeout_seconds: float,
        first_index: int = 0,
        memory: FrameMemory | None = None,
    ) -> None:
        self._stub = stub
        self._header = header
        self._timeout_seconds = timeout_seconds
        self._next_index = first_index
        self._memory = memory
        # The frame memory files written for this segment, and the write in progress (in a thread).
        self._written: list[str] = []
        self._writing: asyncio.Future[list[OutgoingFrames]] | None = None
        self._encoder_metadata: asyncio.Future[Any] | None = None
        self._requests: asyncio.Queue[encoder_pb2.EncodeSegmentRequest | OutgoingFrames | None] = asyncio.Queue(
            SINK_QUEUE_SIZE
        )
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._response: asyncio.Future[encoder_pb2.EncodeSegmentResponse] | None = None
        self.output_uri = header.output_uri

    async def __aenter__(self) -> EncoderSegmentSink:
        self._call = self._stub.EncodeSegment(self._request_stream(), wait_for_ready=True)
        self._response = asyncio.ensure_future(self._call)
        if self._memory is not None:
            self._encoder_metadata = asyncio.ensure_future(self._call.initial_metadata())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for pending in (self._response, self._encoder_metadata):
            if pending is not None and not pending.done():
                pending.cancel()
            if pending is not None:
                # Gathered, so that a failure nobody awaited (the call's, which close() reports) is not logged.
                await asyncio.gather(pending, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
        if self._writing is not None:
            # A cancelled write's thread runs on: its file is discarded once it is there.
            await asyncio.gather(self._writing, return_exceptions=True)
        if self._memory is not None:
            self._memory.discard(self._written)

    @property
    def sends_through_frame_memory(self) -> bool:
        """Whether batches go through the frame memory now: the encoder has named the same domain."""
        return self._shared_memory() is not None

    def _shared_memory(self) -> FrameMemory | None:
        """The frame memory, once the encoder has said it shares it (never waited for: frames go in the messages
        meanwhile)."""
        metadata = self._encoder_metadata
        if self._memory is None or metadata is None or not metadata.done() or metadata.cancelled():
            return None
        if metadata.exception() is not None:
            return None
        return self._memory if self._memory.shares(domain_from_metadata(metadata.result())) else None

    async def _request_stream(self) -> AsyncIterator[encoder_pb2.EncodeSegmentRequest | OutgoingFrames]:
        yield encoder_pb2.EncodeSegmentRequest(header=self._header)
        while (request := await self._requests.get()) is not None:
            yield request

    def _started(self) -> asyncio.Future[encoder_pb2.EncodeSegmentResponse]:
        if self._response is None:
            raise Internal("the encoder sink is used outside its `async with` block")
        return self._response

    async def _response_error(self) -> Exception:
        response = self._started()
        try:
            await response
        except grpc.aio.AioRpcError as error:
            return encoder_stream_error(self.output_uri, error)
        return Internal("the encoder ended the segment stream before the worker closed it")

    async def _send(self, request: OutgoingFrames | None) -> None:
        """Queues a request, unless the stream fails first: a dead encoder must not block the pipeline.

        An encoder that takes nothing for `timeout_seconds` (down and not back, or stuck) ends the
        chunk as DeadlineExceeded.
        """
        response = self._started()
        put = asyncio.ensure_future(self._requests.put(request))
        racing: set[asyncio.Future[Any]] = {put, response}
        await asyncio.wait(racing, timeout=self._timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
        if put.done():
            return
        put.cancel()
        if response.done():
            raise await self._response_error()
        raise DeadlineExceeded(
            f"encoder: took no frames for {self._timeout_seconds:.0f} s ({excerpt(self.output_uri)})"
        )

    async def write(self, frames: Frames) -> None:
        indices = list(range(self._next_index, self._next_index + len(frames)))
        self._next_index += len(frames)
        memory = self._shared_memory()
        if memory is None:
            runs, _ = outgoing_runs(None, frames, indices)
        else:
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._put, memory, frames, indices))
            runs = await asyncio.shield(self._writing)
        for run in runs:
            await self._send(run)

    def _put(self, memory: FrameMemory, frames: Frames, indices: list[int]) -> list[OutgoingFrames]:
        """In a thread: the batch into the frame memory, its file noted at once, so that a write whose caller was
        cancelled still has its file removed."""
        runs, name = outgoing_runs(memory, frames, indices)
        if name is not None:
            self._written.append(name)
        return runs

    async def close(self) -> int:
        await self._send(None)
        try:
            result = await asyncio.wait_for(self._started(), self._timeout_seconds)
        except TimeoutError:
            raise DeadlineExceeded(
                f"encoder: did not finish the segment in {self._timeout_seconds:.0f} s ({excerpt(self.output_uri)})"
            ) from None
        except grpc.aio.AioRpcError as error:
            raise encoder_stream_error(self.output_uri, error) from error
        self.output_uri = result.output_uri or self.output_uri
        return int(result.frames)

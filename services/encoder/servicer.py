"""EncoderService: EncodeSegment (a header, then frame batches) and Join, under the media root."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from services.common.errors import InvalidArgument
from services.common.frame_codec import Frames, unpack_frames
from services.common.frame_streams import EncodeSegmentMessage
from services.common.frame_wire import FrameBatchView
from services.common.media_paths import existing_media_path, relative_uri, writable_media_path
from services.encoder.segment_joiner import join_segments
from services.encoder.segment_writer import SegmentWriter
from services.encoder.settings import EncoderSettings
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name

ResultT = TypeVar("ResultT")


class _EncodeClock:
    """Seconds spent in encoder work, excluding the time spent waiting for the client's frames."""

    def __init__(self) -> None:
        self.seconds = 0.0

    async def run(self, work: Callable[..., ResultT], *arguments: Any) -> ResultT:
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(work, *arguments)
        finally:
            self.seconds += time.perf_counter() - started


def _batch_frames(header: encoder_pb2.SegmentHeader, message: EncodeSegmentMessage) -> Frames:
    if not isinstance(message, FrameBatchView):
        raise InvalidArgument(f"{header.output_uri}: only frame batches may follow the header")
    if message.frames and (message.width, message.height) != (header.width, header.height):
        raise InvalidArgument(
            f"{header.output_uri}: frame batch is {message.width}x{message.height}, "
            f"the header says {header.width}x{header.height}"
        )
    frames, _indices, _pts = unpack_frames(message, copy=False)
    return frames


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, settings: EncoderSettings) -> None:
        self._settings = settings

    def _open_writer(self, header: encoder_pb2.SegmentHeader) -> SegmentWriter:
        return SegmentWriter(
            writable_media_path(self._settings.media_root, header.output_uri),
            fps=header.fps,
            width=header.width,
            height=header.height,
            crf=header.settings.crf or self._settings.default_crf,
            preset=header.settings.preset or self._settings.default_preset,
            threads=self._settings.threads,
        )

    async def EncodeSegment(
        self,
        request_iterator: AsyncIterator[EncodeSegmentMessage],
        context: grpc.aio.ServicerContext,
    ) -> encoder_pb2.EncodeSegmentResponse:
        """The header, then frame batches (as frame_streams.register_encoder parses them)."""
        first = await anext(aiter(request_iterator), None)
        if not isinstance(first, encoder_pb2.EncodeSegmentRequest) or first.WhichOneof("payload") != "header":
            raise InvalidArgument("EncodeSegment's first message must be a SegmentHeader")
        header = first.header
        clock = _EncodeClock()
        writer = await clock.run(self._open_writer, header)
        try:
            async for message in request_iterator:
                frames = _batch_frames(header, message)
                if len(frames):
                    await clock.run(writer.write, frames)
            if writer.frames_written == 0:
                raise InvalidArgument(f"{header.output_uri}: no frames followed the header")
            written = await clock.run(writer.close)
        except BaseException:
            await asyncio.to_thread(writer.discard)
            raise
        return encoder_pb2.EncodeSegmentResponse(
            output_uri=relative_uri(self._settings.media_root, writer.path),
            frames=written,
            encode_seconds=clock.seconds,
        )

    async def Join(
        self, request: encoder_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.JoinResponse:
        root = self._settings.media_root
        segments = [existing_media_path(root, uri) for uri in request.segment_uris]
        audio_uri = request.audio_source_uri
        audio_source = existing_media_path(root, audio_uri) if audio_uri else None
        output = writable_media_path(root, request.output_uri)
        result = await asyncio.to_thread(join_segments, segments, output, audio_source)
        return encoder_pb2.JoinResponse(
            output_uri=relative_uri(root, output),
            frames=result.frames,
            audio_copied=result.audio_copied,
            join_seconds=result.seconds,
        )

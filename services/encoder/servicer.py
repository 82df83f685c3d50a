"""EncoderService: EncodeSegment (a header, then frame batches) and Join, under the media root.

Every encoder call runs in a worker thread, never on the event loop, and PyAV's encode and cv2's colour
conversion release the GIL: segments streamed at the same time encode in parallel, each on its share of
the cores (encode_threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from services.common.errors import InvalidArgument
from services.common.frames.frame_codec import Frames, received_frames
from services.common.frames.frame_memory import FRAME_MEMORY_METADATA, FrameMemory
from services.common.frames.frame_streams import EncodeSegmentMessage
from services.common.frames.frame_wire import FrameBatchView
from services.common.input_limits import excerpt
from services.common.media_paths import existing_media_path, relative_uri, resolve_media_path, writable_media_path
from services.encoder.encode_backend import BackendChoice
from services.encoder.encode_threads import OpenSegments, available_cores
from services.encoder.nvenc_writer import NvencSegmentWriter
from services.encoder.segment_joiner import join_segments
from services.encoder.segment_writer import SegmentWriter
from services.encoder.settings import EncoderSettings
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name

ResultT = TypeVar("ResultT")


async def in_thread_to_the_end(work: Callable[[], ResultT], stop: threading.Event | None = None) -> ResultT:
    """Runs work in a thread; a cancelled call sets `stop` and waits for the thread before it goes on.

    A thread cannot be interrupted, so without the wait the clean-up after a cancellation (closing the
    muxer, deleting the file) would run while the thread still uses them.
    """
    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        # The thread's own failure is moot once the call is cancelled; the cancellation goes on.
        with contextlib.suppress(Exception):
            await future
        raise


async def _discarded(writer: SegmentWriter) -> None:
    """Deletes what a failed or cancelled call wrote, to the end: a cancellation arriving meanwhile (gRPC may end
    the request stream first and cancel the handler after) waits for the deletion, so the call never ends with
    its partial file still there. A failure to delete is logged; the call's own error is what the client gets."""
    try:
        await in_thread_to_the_end(writer.discard)
    except Exception:
        log.exception("could not delete the partial segment %s", writer.path.name)


class _EncodeClock:
    """Seconds spent in encoder work, excluding the time spent waiting for the client's frames."""

    def __init__(self) -> None:
        self.seconds = 0.0

    async def run(self, work: Callable[..., ResultT], *arguments: Any, stop: threading.Event | None = None) -> ResultT:
        started = time.perf_counter()
        try:
            return await in_thread_to_the_end(functools.partial(work, *arguments), stop)
        finally:
            self.seconds += time.perf_counter() - started


def _batch_frames(
    header: encoder_pb2.SegmentHeader, message: EncodeSegmentMessage, memory: FrameMemory | None
) -> Frames:
    if not isinstance(message, FrameBatchView):
        raise InvalidArgument(f"{excerpt(header.output_uri)}: only frame batches may follow the header")
    if message.frames and (message.width, message.height) != (header.width, header.height):
        raise InvalidArgument(
            f"{excerpt(header.output_uri)}: frame batch is {message.width}x{message.height}, "
            f"the header says {header.width}x{header.height}"
        )
    frames, _indices, _pts = received_frames(message, memory)
    return frames


def _check_expected_frames(expected: int) -> None:
    if expected < 0:
        raise InvalidArgument(f"expected_frames must be 0 (not checked) or positive, got {expected}")


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(
        self,
        settings: EncoderSettings,
        backend: BackendChoice,
        cores: int | None = None,
        frame_memory: FrameMemory | None = None,
    ) -> None:
        """`cores`: what x264 threads are shared out of; by default the cores this process may use."""
        self._settings = settings
        self._backend = backend
        self._segments = OpenSegments(available_cores() if cores is None else cores)
        self._frame_memory = frame_memory

    @property
    def cores(self) -> int:
        return self._segments.cores

    def _writer_for(self, header: encoder_pb2.SegmentHeader, threads: int) -> SegmentWriter:
        """Checks the header whole before anything is made: the file and the encoder come at the first write."""
        _check_expected_frames(header.expected_frames)
        path = resolve_media_path(self._settings.media_root, header.output_uri)
        crf = header.settings.crf or self._settings.default_crf
        preset = header.settings.preset or self._settings.default_preset
        max_pixels = self._settings.max_frame_pixels
        if self._backend.nvenc is not None:
            return NvencSegmentWriter(
                path, header.fps, header.width, header.height, crf, preset, self._backend.nvenc, max_pixels
            )
        return SegmentWriter(path, header.fps, header.width, header.height, crf, preset, threads, max_pixels)

    async def EncodeSegment(
        self,
        request_iterator: AsyncIterator[EncodeSegmentMessage],
        context: grpc.aio.ServicerContext,
    ) -> encoder_pb2.EncodeSegmentResponse:
        """The header, then frame batches (as frame_streams.register_encoder parses them).

        Cancelled at any moment, the call waits for the write in progress and deletes what it wrote.
        With a frame memory, its domain goes out first, so the caller can send frames through it.
        """
        if self._frame_memory is not None:
            await context.send_initial_metadata(((FRAME_MEMORY_METADATA, self._frame_memory.domain),))
        first = await anext(aiter(request_iterator), None)
        if not isinstance(first, encoder_pb2.EncodeSegmentRequest) or first.WhichOneof("payload") != "header":
            raise InvalidArgument("EncodeSegment's first message must be a SegmentHeader")
        header = first.header
        clock = _EncodeClock()
        with self._segments.opened() as fair_share:
            writer = await clock.run(self._writer_for, header, self._settings.threads or fair_share)
            expected = header.expected_frames
            try:
                async for message in request_iterator:
                    frames = _batch_frames(header, message, self._frame_memory)
                    if expected and writer.frames_written + len(frames) > expected:
                        raise InvalidArgument(
                            f"{excerpt(header.output_uri)}: expected {expected} frames, "
                            f"got more ({writer.frames_written + len(frames)} so far)"
                        )
                    if len(frames):
                        await clock.run(writer.write, frames)
                if expected and writer.frames_written != expected:
                    raise InvalidArgument(
                        f"{excerpt(header.output_uri)}: expected {expected} frames, got {writer.frames_written}"
                    )
                # A cancelled call can reach here: gRPC may end the request stream before it cancels the
                # handler. The cancellation then stops the close before the rename, and nothing is left.
                stop = threading.Event()
                written = await clock.run(writer.close, stop, stop=stop)
            except BaseException:
                await _discarded(writer)
                raise
        return encoder_pb2.EncodeSegmentResponse(
            output_uri=relative_uri(self._settings.media_root, writer.path),
            frames=written,
            encode_seconds=clock.seconds,
        )

    def _join_paths(self, request: encoder_pb2.JoinRequest) -> tuple[list[Path], Path | None, Path]:
        root = self._settings.media_root
        segments = [existing_media_path(root, uri) for uri in request.segment_uris]
        audio_uri = request.audio_source_uri
        audio_source = existing_media_path(root, audio_uri) if audio_uri else None
        return segments, audio_source, writable_media_path(root, request.output_uri)

    async def Join(
        self, request: encoder_pb2.JoinRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.JoinResponse:
        """Cancelled at any moment, the join stops at its next packet and leaves no output behind."""
        _check_expected_frames(request.expected_frames)
        segments, audio_source, output = await asyncio.to_thread(self._join_paths, request)
        stop = threading.Event()
        result = await in_thread_to_the_end(
            functools.partial(join_segments, segments, output, audio_source, request.expected_frames, stop), stop
        )
        return encoder_pb2.JoinResponse(
            output_uri=relative_uri(self._settings.media_root, output),
            frames=result.frames,
            audio_copied=result.audio_copied,
            join_seconds=result.seconds,
        )

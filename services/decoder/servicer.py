"""DecoderService: Probe and Decode over media under the decoder's media root; Decode on NVDEC or PyAV."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import grpc

from services.common.frames.frame_codec import Frames, outgoing_runs
from services.common.frames.frame_memory import FrameMemory, check_tag
from services.common.frames.frame_wire import OutgoingFrames
from services.common.frames.pixel_formats import pixel_format_from_proto
from services.common.media_info import MediaInfo, media_info_to_proto
from services.common.media_paths import existing_media_path
from services.common.media_probe import probe_media
from services.decoder.decode_backend import BackendChoice, iter_decoded_batches
from services.decoder.nvdec_reader import NvdecOpener, open_simple_decoder
from services.decoder.settings import DecoderSettings
from services.decoder.thread_stream import stream_in_thread
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


def _placed(
    batches: Iterator[tuple[Frames, list[int], list[int]]], memory: FrameMemory | None, tag: str, written: list[str]
) -> Generator[list[OutgoingFrames], None, None]:
    """Each batch's messages, its frames written to the frame memory where they fit; runs in the decode thread,
    so the copy does too. The files' names go into `written`."""
    for frames, indices, stamps in batches:
        runs, name = outgoing_runs(memory, frames, indices, stamps, tag)
        if name is not None:
            written.append(name)
        yield runs


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    """Path resolution, probing and decoding touch the disk: all of it runs in worker threads."""

    def __init__(
        self,
        settings: DecoderSettings,
        backend: BackendChoice,
        open_decoder: NvdecOpener = open_simple_decoder,
        frame_memory: FrameMemory | None = None,
    ) -> None:
        self._settings = settings
        self._limits = settings.input_limits
        self._backend = backend
        self._open_decoder = open_decoder
        self._frame_memory = frame_memory

    def _media_path(self, uri: str) -> Path:
        return existing_media_path(self._settings.media_root, uri, self._limits)

    def _probe(self, uri: str) -> MediaInfo:
        return probe_media(self._media_path(uri), self._limits)

    async def Probe(
        self, request: decoder_pb2.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> decoder_pb2.ProbeResponse:
        info = await asyncio.to_thread(self._probe, request.uri)
        return decoder_pb2.ProbeResponse(info=media_info_to_proto(info))

    async def Decode(
        self, request: decoder_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[OutgoingFrames]:
        """FrameRuns (SharedFrameRuns where the caller shares this decoder's frame memory), which
        frame_streams.register_decoder writes as FrameBatch messages.

        A call that fails or is cancelled removes the files it wrote; the caller removes those it did not read.
        """
        pixel_format = pixel_format_from_proto(request.pixel_format)
        memory = self._frame_memory
        if memory is not None and not memory.shares(request.frame_memory_domain):
            memory = None
        tag = check_tag(request.frame_memory_tag) if memory is not None else ""
        path = await asyncio.to_thread(self._media_path, request.uri)
        batches = iter_decoded_batches(
            self._backend,
            path,
            start_frame=request.start_frame,
            seek_pts=request.seek_pts,
            frame_count=request.frame_count,
            batch_size=request.batch_size or self._settings.default_batch_size,
            limits=self._limits,
            max_batch_bytes=self._settings.max_batch_bytes,
            pixel_format=pixel_format,
            gpu_id=self._settings.gpu_id,
            open_decoder=self._open_decoder,
        )
        written: list[str] = []
        placed = stream_in_thread(_placed(batches, memory, tag, written))
        try:
            # Closed before the files are discarded: the batch in flight in the thread is written first.
            async with contextlib.aclosing(placed):
                async for runs in placed:
                    for run in runs:
                        yield run
        except BaseException:
            if memory is not None:
                memory.discard(list(written))
            raise

"""DecoderService: Probe and Decode over media under the decoder's media root; Decode on NVDEC or PyAV."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from services.common.frames.frame_codec import frame_runs
from services.common.frames.frame_wire import FrameRun
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


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    """Path resolution, probing and decoding touch the disk: all of it runs in worker threads."""

    def __init__(
        self, settings: DecoderSettings, backend: BackendChoice, open_decoder: NvdecOpener = open_simple_decoder
    ) -> None:
        self._settings = settings
        self._limits = settings.input_limits
        self._backend = backend
        self._open_decoder = open_decoder

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
    ) -> AsyncIterator[FrameRun]:
        """FrameRuns, which frame_streams.register_decoder writes as FrameBatch messages."""
        pixel_format = pixel_format_from_proto(request.pixel_format)
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
        async for frames, indices, stamps in stream_in_thread(batches):
            for run in frame_runs(frames, indices, stamps):
                yield run

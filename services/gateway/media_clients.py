"""The gateway's calls to the decoder (probe), the detector (source faces) and the encoder (join)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import grpc
import numpy as np

from services.common.errors import from_rpc_error
from services.common.frames.frame_codec import pack_frames
from services.common.grpc_channel import ChannelSecurity, open_channel
from services.common.media_info import MediaInfo, media_info_from_proto
from services.common.server_settings import DEFAULT_MAX_MESSAGE_BYTES
from services.gateway.job_records import JoinOutcome
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from swapline.detector.v1 import detector_pb2, detector_pb2_grpc
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc

# The detector needs no more than this on the long side to find a face in a portrait.
DETECT_LONG_SIDE = 640


class MediaServices(Protocol):
    async def probe(self, uri: str) -> MediaInfo: ...

    async def count_faces(self, image_rgb: np.ndarray) -> int: ...

    async def join(
        self, segment_uris: Sequence[str], audio_source_uri: str, output_uri: str, expected_frames: int
    ) -> JoinOutcome: ...

    async def close(self) -> None: ...


def downscaled(image_rgb: np.ndarray, long_side: int = DETECT_LONG_SIDE) -> np.ndarray:
    height, width = image_rgb.shape[:2]
    scale = long_side / max(height, width)
    if scale >= 1.0:
        return image_rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)


class GrpcMediaServices:
    def __init__(
        self,
        decoder_target: str,
        detector_target: str,
        encoder_target: str,
        timeout_seconds: float,
        join_timeout_seconds: float,
        security: ChannelSecurity,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._channels = [
            open_channel(target, security, max_message_bytes)
            for target in (decoder_target, detector_target, encoder_target)
        ]
        self._decoder = decoder_pb2_grpc.DecoderServiceStub(self._channels[0])
        self._detector = detector_pb2_grpc.DetectorServiceStub(self._channels[1])
        self._encoder = encoder_pb2_grpc.EncoderServiceStub(self._channels[2])
        self._timeout_seconds = timeout_seconds
        self._join_timeout_seconds = join_timeout_seconds

    async def probe(self, uri: str) -> MediaInfo:
        try:
            response = await self._decoder.Probe(decoder_pb2.ProbeRequest(uri=uri), timeout=self._timeout_seconds)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return media_info_from_proto(response.info)

    async def count_faces(self, image_rgb: np.ndarray) -> int:
        small = np.ascontiguousarray(downscaled(image_rgb))
        request = detector_pb2.DetectRequest(frames=pack_frames(small[None], [0]))
        try:
            response = await self._detector.Detect(request, timeout=self._timeout_seconds)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return sum(len(frame.faces) for frame in response.frames)

    async def join(
        self, segment_uris: Sequence[str], audio_source_uri: str, output_uri: str, expected_frames: int
    ) -> JoinOutcome:
        """expected_frames: the encoder refuses (FAILED_PRECONDITION) an output holding another count."""
        request = encoder_pb2.JoinRequest(
            segment_uris=list(segment_uris),
            audio_source_uri=audio_source_uri,
            output_uri=output_uri,
            expected_frames=expected_frames,
        )
        try:
            response = await self._encoder.Join(request, timeout=self._join_timeout_seconds)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return JoinOutcome(
            output_uri=response.output_uri or output_uri,
            frames=response.frames,
            audio_copied=response.audio_copied,
            join_seconds=response.join_seconds,
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

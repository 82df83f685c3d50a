"""The calls that carry frames, Decode (decoder -> worker), EncodeSegment (worker -> encoder) and Detect
(worker -> detector), on frame_wire's codecs: the servers' registrations and the worker's stubs.

Decode's messages are FrameRuns or SharedFrameRuns on the server and FrameBatchViews on the client.
EncodeSegment's first message stays a generated EncodeSegmentRequest carrying the header; the frames after it
are FrameRuns or SharedFrameRuns on the client and FrameBatchViews on the server. Detect's request is a
DetectFrames: the frames apart, the other fields in a generated DetectRequest. The bytes on the wire are the
protos' own, so generated clients and servers interoperate with these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from services.common.frames.frame_wire import (
    FrameBatchView,
    FrameRun,
    OutgoingFrames,
    SharedFrameRun,
    parse_frame_batch,
    serialize_frame_batch,
    serialize_frame_batch_field,
    split_frame_batch_field,
)
from services.common.grpc_codecs import MethodCodec, register_with_codecs, stub_with_codecs
from swapline.decoder.v1 import decoder_pb2_grpc
from swapline.detector.v1 import detector_pb2, detector_pb2_grpc
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc

_ENCODE_FRAMES_FIELD = encoder_pb2.EncodeSegmentRequest.DESCRIPTOR.fields_by_name["frames"].number
_DETECT_FRAMES_FIELD = detector_pb2.DetectRequest.DESCRIPTOR.fields_by_name["frames"].number

EncodeSegmentMessage = encoder_pb2.EncodeSegmentRequest | FrameBatchView


def serialize_encode_segment_request(message: encoder_pb2.EncodeSegmentRequest | OutgoingFrames) -> bytes:
    if isinstance(message, FrameRun | SharedFrameRun):
        return serialize_frame_batch_field(_ENCODE_FRAMES_FIELD, message)
    return message.SerializeToString()


def parse_encode_segment_request(data: bytes) -> EncodeSegmentMessage:
    frames, _ = split_frame_batch_field(_ENCODE_FRAMES_FIELD, data)
    return frames if frames is not None else encoder_pb2.EncodeSegmentRequest.FromString(data)


FramesT = TypeVar("FramesT", FrameRun, FrameBatchView)


@dataclass(frozen=True)
class DetectFrames(Generic[FramesT]):
    """A DetectRequest whose frames travel apart: a FrameRun to send, a FrameBatchView received."""

    frames: FramesT
    # The request's other fields; its own frames field stays empty.
    options: detector_pb2.DetectRequest


def serialize_detect_request(request: DetectFrames[FrameRun]) -> bytes:
    return request.options.SerializeToString() + serialize_frame_batch_field(_DETECT_FRAMES_FIELD, request.frames)


def parse_detect_request(data: bytes) -> DetectFrames[FrameBatchView]:
    frames, rest = split_frame_batch_field(_DETECT_FRAMES_FIELD, data)
    return DetectFrames(frames or FrameBatchView(0, 0, []), detector_pb2.DetectRequest.FromString(rest))


_DECODER_CODECS = {
    "Decode": MethodCodec(response_serializer=serialize_frame_batch, response_deserializer=parse_frame_batch)
}
_ENCODER_CODECS = {
    "EncodeSegment": MethodCodec(
        request_serializer=serialize_encode_segment_request, request_deserializer=parse_encode_segment_request
    )
}
_DETECTOR_CODECS = {
    "Detect": MethodCodec(request_serializer=serialize_detect_request, request_deserializer=parse_detect_request)
}

register_decoder = register_with_codecs(decoder_pb2_grpc.add_DecoderServiceServicer_to_server, _DECODER_CODECS)
register_encoder = register_with_codecs(encoder_pb2_grpc.add_EncoderServiceServicer_to_server, _ENCODER_CODECS)
register_detector = register_with_codecs(detector_pb2_grpc.add_DetectorServiceServicer_to_server, _DETECTOR_CODECS)


def decoder_stub(channel: grpc.aio.Channel) -> decoder_pb2_grpc.DecoderServiceStub:
    """A DecoderServiceStub whose Decode yields FrameBatchViews."""
    return stub_with_codecs(decoder_pb2_grpc.DecoderServiceStub, channel, _DECODER_CODECS)


def encoder_stub(channel: grpc.aio.Channel) -> encoder_pb2_grpc.EncoderServiceStub:
    """An EncoderServiceStub whose EncodeSegment takes the header message, then FrameRuns."""
    return stub_with_codecs(encoder_pb2_grpc.EncoderServiceStub, channel, _ENCODER_CODECS)


def detector_stub(channel: grpc.aio.Channel) -> detector_pb2_grpc.DetectorServiceStub:
    """A DetectorServiceStub whose Detect takes a DetectFrames."""
    return stub_with_codecs(detector_pb2_grpc.DetectorServiceStub, channel, _DETECTOR_CODECS)

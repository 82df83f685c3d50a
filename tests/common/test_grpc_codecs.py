"""register_with_codecs and stub_with_codecs refuse codecs for methods the service does not have."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from services.common.errors import Internal
from services.common.grpc_codecs import MethodCodec, register_with_codecs, stub_with_codecs
from swapline.decoder.v1 import decoder_pb2_grpc

_MISSPELT = {"Decodes": MethodCodec(response_serializer=bytes, response_deserializer=bytes)}


def test_a_server_codec_for_an_unknown_method_is_refused() -> None:
    register = register_with_codecs(decoder_pb2_grpc.add_DecoderServiceServicer_to_server, _MISSPELT)
    server: Any = None  # never reached: the check runs before anything is added to the server
    with pytest.raises(Internal, match="no method 'Decodes'"):
        register(decoder_pb2_grpc.DecoderServiceServicer(), server)


def test_a_client_codec_for_an_unknown_method_is_refused() -> None:
    async def build() -> None:
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            stub_with_codecs(decoder_pb2_grpc.DecoderServiceStub, channel, _MISSPELT)

    with pytest.raises(Internal, match="no method 'Decodes'"):
        asyncio.run(build())

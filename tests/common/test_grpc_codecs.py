"""register_with_codecs refuses codecs for methods the service does not have."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.errors import Internal
from services.common.grpc_codecs import MethodCodec, register_with_codecs
from swapline.decoder.v1 import decoder_pb2_grpc


def test_a_codec_for_an_unknown_method_is_refused() -> None:
    register = register_with_codecs(
        decoder_pb2_grpc.add_DecoderServiceServicer_to_server, {"Decodes": MethodCodec(response_serializer=bytes)}
    )
    server: Any = None  # never reached: the check runs before anything is added to the server
    with pytest.raises(Internal, match="no method 'Decodes'"):
        register(decoder_pb2_grpc.DecoderServiceServicer(), server)

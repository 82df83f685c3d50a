from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.cli import sample_media
from services.common.frame_codec import unpack_frames
from services.decoder.__main__ import binding
from services.decoder.media_probe import probe_media
from services.decoder.settings import DecoderSettings
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from tests.decoder.in_process_server import serving


@pytest.fixture(scope="module")
def stub(media_root: Path) -> Iterator[decoder_pb2_grpc.DecoderServiceStub]:
    settings = DecoderSettings(media_root=media_root, port=0, default_batch_size=4)
    with serving(settings, [binding(settings)]) as channel:
        yield decoder_pb2_grpc.DecoderServiceStub(channel)


def test_probe_answers_media_info(stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path) -> None:
    info = stub.Probe(decoder_pb2.ProbeRequest(uri=small_video.name)).info
    expected = probe_media(small_video)
    assert info.kind == decoder_pb2.MEDIA_KIND_VIDEO
    assert (info.frame_count, info.width, info.height) == (
        expected.frame_count, expected.width, expected.height
    )
    assert info.fps == expected.fps and info.has_audio
    assert [(key.frame_index, key.pts) for key in info.keyframes] == [
        (key.frame_index, key.pts) for key in expected.keyframes
    ]
    assert (info.time_base_num, info.time_base_den) == expected.time_base


def test_probe_missing_file_is_not_found(stub: decoder_pb2_grpc.DecoderServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Probe(decoder_pb2.ProbeRequest(uri="missing.mp4"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_probe_outside_media_root_is_denied(stub: decoder_pb2_grpc.DecoderServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Probe(decoder_pb2.ProbeRequest(uri="../outside"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_probe_text_file_is_invalid(stub: decoder_pb2_grpc.DecoderServiceStub, media_root: Path) -> None:
    sample_media.make_not_media_file(media_root / "readme.txt")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Probe(decoder_pb2.ProbeRequest(uri="readme.txt"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "readme.txt is not a video or image" in caught.value.details()


def test_decode_streams_the_requested_frames(
    stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path
) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    request = decoder_pb2.DecodeRequest(
        uri=small_video.name, start_frame=keyframe.frame_index, seek_pts=keyframe.pts, frame_count=14
    )
    batches = [unpack_frames(batch) for batch in stub.Decode(request)]
    assert [len(frames) for frames, _, _ in batches] == [4, 4, 4, 2]
    indices = [index for _, batch_indices, _ in batches for index in batch_indices]
    assert indices == list(range(keyframe.frame_index, keyframe.frame_index + 14))
    frames = np.concatenate([frames for frames, _, _ in batches])
    assert frames.shape == (14, 240, 320, 3)
    assert batches[0][2][0] == keyframe.pts


def test_decode_past_the_end_is_invalid(stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path) -> None:
    info = probe_media(small_video)
    request = decoder_pb2.DecodeRequest(uri=small_video.name, frame_count=info.frame_count + 1, batch_size=16)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Decode(request))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at frame {info.frame_count}" in caught.value.details()

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.cli import sample_media
from services.common.frame_codec import pack_frames
from services.decoder.media_probe import probe_media
from services.encoder.__main__ import binding
from services.encoder.settings import EncoderSettings
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from tests.decoder.in_process_server import serving
from tests.encoder.conftest import FPS, SIZE


@pytest.fixture(scope="module")
def stub(media_root: Path) -> Iterator[encoder_pb2_grpc.EncoderServiceStub]:
    settings = EncoderSettings(media_root=media_root, port=0)
    with serving(settings, [binding(settings)]) as channel:
        yield encoder_pb2_grpc.EncoderServiceStub(channel)


def header(uri: str, width: int = SIZE[0], height: int = SIZE[1]) -> encoder_pb2.EncodeSegmentRequest:
    return encoder_pb2.EncodeSegmentRequest(
        header=encoder_pb2.SegmentHeader(output_uri=uri, fps=FPS, width=width, height=height)
    )


def batches(frames: np.ndarray, first_index: int, size: int) -> list[encoder_pb2.EncodeSegmentRequest]:
    requests = []
    for start in range(0, len(frames), size):
        chunk = frames[start:start + size]
        indices = range(first_index + start, first_index + start + len(chunk))
        requests.append(encoder_pb2.EncodeSegmentRequest(frames=pack_frames(chunk, indices)))
    return requests


def test_encode_segments_then_join(
    stub: encoder_pb2_grpc.EncoderServiceStub,
    media_root: Path,
    original_video: Path,
    original_frames: np.ndarray,
) -> None:
    answers = []
    for n, start in enumerate((0, 20)):
        requests = [header(f"job/seg-{n}.mp4"), *batches(original_frames[start:start + 20], start, 8)]
        answers.append(stub.EncodeSegment(iter(requests)))
    assert [(answer.output_uri, answer.frames) for answer in answers] == [
        ("job/seg-0.mp4", 20), ("job/seg-1.mp4", 20)
    ]
    assert all(answer.encode_seconds > 0 for answer in answers)
    assert probe_media(media_root / "job/seg-1.mp4").frame_count == 20

    joined = stub.Join(encoder_pb2.JoinRequest(
        segment_uris=[answer.output_uri for answer in answers],
        audio_source_uri=original_video.name,
        output_uri="job/output.mp4",
    ))
    assert (joined.output_uri, joined.frames, joined.audio_copied) == ("job/output.mp4", 40, True)
    info = probe_media(media_root / "job/output.mp4")
    assert (info.frame_count, info.fps, info.width, info.height, info.has_audio) == (40, FPS, *SIZE, True)


def test_first_message_must_be_header(
    stub: encoder_pb2_grpc.EncoderServiceStub, original_frames: np.ndarray
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.EncodeSegment(iter(batches(original_frames[:2], 0, 2)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must be a SegmentHeader" in caught.value.details()


def test_batch_size_must_match_header(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.EncodeSegment(iter([header("mismatch.mp4", 160, 120), *batches(original_frames[:2], 0, 2)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the header says 160x120" in caught.value.details()
    assert not (media_root / "mismatch.mp4").exists()


def test_join_missing_segment_is_not_found(stub: encoder_pb2_grpc.EncoderServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Join(encoder_pb2.JoinRequest(segment_uris=["missing.mp4"], output_uri="out.mp4"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_output_outside_media_root_is_denied(
    stub: encoder_pb2_grpc.EncoderServiceStub, original_frames: np.ndarray
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.EncodeSegment(iter([header("../outside.mp4"), *batches(original_frames[:2], 0, 2)]))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_join_text_audio_source_is_invalid(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path
) -> None:
    sample_media.make_not_media_file(media_root / "notes.txt")
    sample_media.make_not_media_file(media_root / "notes.mp4")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Join(encoder_pb2.JoinRequest(
            segment_uris=["notes.mp4"], audio_source_uri="notes.txt", output_uri="o.mp4"
        ))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

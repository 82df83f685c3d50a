from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import grpc
import numpy as np
import pytest

from services.cli import sample_media
from services.common.frames.frame_codec import unpack_frames
from services.common.frames.frame_streams import register_decoder
from services.common.grpc_server import ServiceBinding
from services.common.input_limits import InputLimits
from services.common.media_paths import existing_media_path
from services.common.media_probe import probe_media
from services.decoder.__main__ import binding
from services.decoder.decode_backend import BackendChoice
from services.decoder.frame_reader import iter_frame_batches
from services.decoder.servicer import SERVICE_NAME, DecoderServicer
from services.decoder.settings import DecoderSettings
from swapline.common.v1 import common_pb2
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from tests.decoder.fake_nvdec import FakeOpenerFailure
from tests.decoder.in_process_server import serving

PYAV = BackendChoice("cpu", "cpu", "test")


def plaintext_settings(media_root: Path) -> DecoderSettings:
    return DecoderSettings(
        media_root=media_root, port=0, default_batch_size=4, transport_security="plaintext", auth_mode="open"
    )


@pytest.fixture(scope="module")
def stub(media_root: Path) -> Iterator[decoder_pb2_grpc.DecoderServiceStub]:
    settings = plaintext_settings(media_root)
    with serving(settings, [binding(settings, PYAV)]) as channel:
        yield decoder_pb2_grpc.DecoderServiceStub(channel)


def call_code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


def test_probe_answers_media_info(stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path) -> None:
    info = stub.Probe(decoder_pb2.ProbeRequest(uri=small_video.name)).info
    expected = probe_media(small_video)
    assert info.kind == decoder_pb2.MEDIA_KIND_VIDEO
    assert (info.frame_count, info.width, info.height) == (expected.frame_count, expected.width, expected.height)
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
    assert "readme.txt' is not a video or image" in caught.value.details()


def test_decode_streams_the_requested_frames(stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path) -> None:
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


def test_oversized_video_is_invalid_at_probe_and_decode(
    stub: decoder_pb2_grpc.DecoderServiceStub, oversized_video: Path
) -> None:
    probe = call_code(lambda: stub.Probe(decoder_pb2.ProbeRequest(uri=oversized_video.name)))
    decode = call_code(lambda: list(stub.Decode(decoder_pb2.DecodeRequest(uri=oversized_video.name, frame_count=2))))
    assert probe[0] == decode[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "6000x6000" in probe[1] and "6000x6000" in decode[1]


@pytest.mark.parametrize(
    "uri",
    ["clip\x00.mp4", "clip\n.mp4", f"{'x' * 300}.mp4", "d/" * 600, "../" * 400 + "etc/passwd"],
    ids=["nul", "newline", "long name", "long uri", "long traversal"],
)
def test_bad_uris_are_invalid_and_hide_the_media_root(
    stub: decoder_pb2_grpc.DecoderServiceStub, media_root: Path, uri: str
) -> None:
    for code, details in (
        call_code(lambda: stub.Probe(decoder_pb2.ProbeRequest(uri=uri))),
        call_code(lambda: list(stub.Decode(decoder_pb2.DecodeRequest(uri=uri, frame_count=1)))),
    ):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert str(media_root) not in details and len(details) < 300


def test_paths_are_resolved_off_the_event_loop(
    stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved_on_loop: list[bool] = []

    def recording(media_root: Path, uri: str, limits: InputLimits) -> Path:
        resolved_on_loop.append(_running_loop() is not None)
        return existing_media_path(media_root, uri, limits)

    monkeypatch.setattr("services.decoder.servicer.existing_media_path", recording)
    stub.Probe(decoder_pb2.ProbeRequest(uri=small_video.name))
    list(stub.Decode(decoder_pb2.DecodeRequest(uri=small_video.name, frame_count=1)))
    assert resolved_on_loop == [False, False]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def test_an_auto_decoder_without_nvdec_streams_pyavs_frames(media_root: Path, small_video: Path) -> None:
    settings = plaintext_settings(media_root)
    opener = FakeOpenerFailure(ImportError("No module named 'PyNvVideoCodec'"))
    servicer = DecoderServicer(settings, BackendChoice("auto", "nvdec", "test"), open_decoder=opener)
    keyframe = probe_media(small_video).keyframes[1]
    request = decoder_pb2.DecodeRequest(
        uri=small_video.name, start_frame=keyframe.frame_index, seek_pts=keyframe.pts, frame_count=10
    )
    with serving(settings, [ServiceBinding(servicer, register_decoder, SERVICE_NAME)]) as channel:
        batches = [unpack_frames(batch) for batch in decoder_pb2_grpc.DecoderServiceStub(channel).Decode(request)]
    expected = list(iter_frame_batches(small_video, keyframe.frame_index, keyframe.pts, 10, 4))
    assert opener.attempts == 1
    assert [indices for _, indices, _ in batches] == [indices for _, indices, _ in expected]
    assert np.array_equal(np.concatenate([f for f, _, _ in batches]), np.concatenate([f for f, _, _ in expected]))


def pyav_frames(path: Path, pixel_format: str) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format=pixel_format) for frame in container.decode(video=0)])


def test_decode_asked_for_nv12_streams_nv12_batches_of_pyavs_frames(
    stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path
) -> None:
    keyframe = probe_media(small_video).keyframes[1]
    start = keyframe.frame_index
    request = decoder_pb2.DecodeRequest(
        uri=small_video.name,
        start_frame=start,
        seek_pts=keyframe.pts,
        frame_count=10,
        pixel_format=common_pb2.PIXEL_FORMAT_NV12,
    )
    answers = list(stub.Decode(request))
    assert [batch.pixel_format for batch in answers] == [common_pb2.PIXEL_FORMAT_NV12] * 3
    assert all((batch.width, batch.height) == (320, 240) for batch in answers)
    assert all(len(frame.pixels) == 320 * 240 * 3 // 2 for batch in answers for frame in batch.frames)
    batches = [unpack_frames(batch) for batch in answers]
    assert [index for _, indices, _ in batches for index in indices] == list(range(start, start + 10))
    frames = np.concatenate([frames for frames, _, _ in batches])
    assert frames.shape == (10, 360, 320)
    assert np.array_equal(frames, pyav_frames(small_video, "nv12")[start : start + 10])


def test_decode_without_a_pixel_format_streams_rgb_as_before(
    stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path
) -> None:
    answers = list(stub.Decode(decoder_pb2.DecodeRequest(uri=small_video.name, frame_count=6)))
    assert [batch.pixel_format for batch in answers] == [common_pb2.PIXEL_FORMAT_RGB24] * 2
    frames = np.concatenate([unpack_frames(batch)[0] for batch in answers])
    assert frames.shape == (6, 240, 320, 3)
    assert np.array_equal(frames, pyav_frames(small_video, "rgb24")[:6])


def test_decode_asked_for_nv12_of_an_odd_sized_picture_streams_rgb(
    stub: decoder_pb2_grpc.DecoderServiceStub, media_root: Path
) -> None:
    image = sample_media.make_two_person_image(media_root / "odd-sided.png", size=(321, 181))
    request = decoder_pb2.DecodeRequest(uri="odd-sided.png", frame_count=1, pixel_format=common_pb2.PIXEL_FORMAT_NV12)
    (answer,) = list(stub.Decode(request))
    assert (answer.pixel_format, answer.width, answer.height) == (common_pb2.PIXEL_FORMAT_RGB24, 321, 181)
    assert np.array_equal(unpack_frames(answer)[0][0], image)


def test_decode_asked_for_an_unknown_pixel_format_is_invalid(
    stub: decoder_pb2_grpc.DecoderServiceStub, small_video: Path
) -> None:
    request = decoder_pb2.DecodeRequest(uri=small_video.name, frame_count=1, pixel_format=7)  # type: ignore[arg-type]
    code, details = call_code(lambda: list(stub.Decode(request)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown pixel format 7" in details

from __future__ import annotations

import asyncio
import functools
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from services.cli import sample_media
from services.common.frames.frame_codec import pack_frames
from services.common.frames.pixel_formats import rgb_to_nv12
from services.common.media_probe import probe_media
from services.encoder.__main__ import binding
from services.encoder.encode_backend import BackendChoice, choose_backend
from services.encoder.segment_writer import SegmentWriter
from services.encoder.servicer import in_thread_to_the_end
from services.encoder.settings import EncoderSettings
from swapline.common.v1 import common_pb2
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from tests.decoder.in_process_server import serving
from tests.encoder.conftest import FPS, SIZE, decoded_frames, encoder_process
from tests.encoder.fake_nvenc import FakeNvenc

# Enough that the unfixed encoder (writes racing discard) crashed every run tried; it died within 10.
CANCELLED_STREAMS = 24
# Noise is slow to encode, so a cancellation nearly always lands while a batch is being written.
NOISE_FRAMES = np.random.default_rng(7).integers(0, 256, (4, 360, 480, 3), dtype=np.uint8)


def encoder_settings(media_root: Path, threads: int = 0) -> EncoderSettings:
    return EncoderSettings(
        media_root=media_root, port=0, transport_security="plaintext", auth_mode="open", threads=threads
    )


@pytest.fixture(scope="module")
def stub(media_root: Path) -> Iterator[encoder_pb2_grpc.EncoderServiceStub]:
    # One x264 thread: it then holds back a fixed number of frames, so a file appears after the first dozen.
    settings = encoder_settings(media_root, threads=1)
    # Backend auto, as the encoder starts: on this machine (no PyNvVideoCodec, no GPU) it is libx264.
    backend = choose_backend(settings.backend)
    assert backend.active == "libx264"
    with serving(settings, [binding(settings, backend)]) as channel:
        yield encoder_pb2_grpc.EncoderServiceStub(channel)


def header(
    uri: str,
    width: int = SIZE[0],
    height: int = SIZE[1],
    fps: float = FPS,
    crf: int = 0,
    preset: str = "",
    expected_frames: int = 0,
) -> encoder_pb2.EncodeSegmentRequest:
    return encoder_pb2.EncodeSegmentRequest(
        header=encoder_pb2.SegmentHeader(
            output_uri=uri,
            fps=fps,
            width=width,
            height=height,
            settings=encoder_pb2.EncodeSettings(crf=crf, preset=preset),
            expected_frames=expected_frames,
        )
    )


def batches(frames: np.ndarray, first_index: int, size: int) -> list[encoder_pb2.EncodeSegmentRequest]:
    requests = []
    for start in range(0, len(frames), size):
        chunk = frames[start : start + size]
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
        requests = [header(f"job/seg-{n}.mp4"), *batches(original_frames[start : start + 20], start, 8)]
        answers.append(stub.EncodeSegment(iter(requests)))
    assert [(answer.output_uri, answer.frames) for answer in answers] == [("job/seg-0.mp4", 20), ("job/seg-1.mp4", 20)]
    assert all(answer.encode_seconds > 0 for answer in answers)
    assert probe_media(media_root / "job/seg-1.mp4").frame_count == 20

    joined = stub.Join(
        encoder_pb2.JoinRequest(
            segment_uris=[answer.output_uri for answer in answers],
            audio_source_uri=original_video.name,
            output_uri="job/output.mp4",
        )
    )
    assert (joined.output_uri, joined.frames, joined.audio_copied) == ("job/output.mp4", 40, True)
    info = probe_media(media_root / "job/output.mp4")
    assert (info.frame_count, info.fps, info.width, info.height, info.has_audio) == (40, FPS, *SIZE, True)


def test_first_message_must_be_header(stub: encoder_pb2_grpc.EncoderServiceStub, original_frames: np.ndarray) -> None:
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


def test_join_text_audio_source_is_invalid(stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path) -> None:
    sample_media.make_not_media_file(media_root / "notes.txt")
    sample_media.make_not_media_file(media_root / "notes.mp4")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Join(encoder_pb2.JoinRequest(segment_uris=["notes.mp4"], audio_source_uri="notes.txt", output_uri="o.mp4"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def holds_files(folder: Path) -> bool:
    return bool(files_under(folder))


def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def endless_segment(
    uri: str, batches_before_signal: int, sent: threading.Event
) -> Iterator[encoder_pb2.EncodeSegmentRequest]:
    """A header, then noise batches until the call ends; `sent` is set once that many batches went out."""
    yield header(uri, width=480, height=360)
    batch = encoder_pb2.EncodeSegmentRequest(frames=pack_frames(NOISE_FRAMES, range(len(NOISE_FRAMES))))
    count = 0
    while True:
        if count == batches_before_signal:
            sent.set()
        yield batch
        count += 1


def test_cancelling_streams_mid_write_leaves_the_encoder_running_and_no_files(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    media_root = tmp_path / "media"
    cancelled = media_root / "cancelled"
    with encoder_process(media_root, tmp_path / "encoder.log") as (process, channel):

        def encoder_state() -> str:
            log = (tmp_path / "encoder.log").read_text()[-2000:]
            return f"the encoder's exit status: {process.poll()} (None: running); its log ends:\n{log}"

        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        for attempt in range(CANCELLED_STREAMS):
            sent = threading.Event()
            folder = cancelled / str(attempt)
            # Even attempts cancel right after the header or the first batches went out (the open, the
            # first writes); odd ones once the segment's file exists, with the muxer under way.
            call = stub.EncodeSegment.future(endless_segment(f"cancelled/{attempt}/seg.mp4", attempt % 5, sent))
            assert sent.wait(30), encoder_state()
            if attempt % 2:
                assert wait_until(functools.partial(holds_files, folder)), encoder_state()
            call.cancel()
            assert call.cancelled()
            assert process.poll() is None, encoder_state()
        assert wait_until(lambda: not files_under(cancelled)), files_under(cancelled)

        answer = stub.EncodeSegment(iter([header("after/seg.mp4"), *batches(original_frames[:10], 0, 5)]))
        assert answer.frames == 10
        assert probe_media(media_root / "after/seg.mp4").frame_count == 10
        assert files_under(media_root / "after") == ["seg.mp4"]
        assert process.poll() is None, encoder_state()


def header_then_wait(
    request: encoder_pb2.EncodeSegmentRequest, release: threading.Event
) -> Iterator[encoder_pb2.EncodeSegmentRequest]:
    """The header, then nothing until released: an answer before then came from the header alone."""
    yield request
    release.wait(60)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"crf": -1}, "crf -1 is outside 0..51"),
        ({"crf": 52}, "crf 52 is outside 0..51"),
        ({"preset": "bogus"}, "preset 'bogus' is not one of"),
        ({"width": 321}, "even width and height, got 321x240"),
        ({"width": 0}, "frame size must be positive"),
        ({"width": 100_000, "height": 100_000}, "100000x100000 is over the limit"),
        ({"fps": 0.0}, "fps must be above 0"),
        ({"fps": -25.0}, "fps must be above 0"),
        ({"fps": float("inf")}, "fps must be above 0"),
        ({"fps": 1e9}, "fps must be above 0"),
        ({"expected_frames": -1}, "expected_frames must be 0"),
    ],
)
def test_bad_header_is_refused_before_any_frame_or_file(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, settings: dict[str, Any], message: str
) -> None:
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.EncodeSegment(header_then_wait(header("refused/seg.mp4", **settings), release), timeout=20)
    finally:
        release.set()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert not (media_root / "refused").exists()


def test_frame_count_must_match_expected_frames(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    with pytest.raises(grpc.RpcError) as fewer:
        stub.EncodeSegment(iter([header("counted/few.mp4", expected_frames=5), *batches(original_frames[:4], 0, 2)]))
    with pytest.raises(grpc.RpcError) as more:
        stub.EncodeSegment(iter([header("counted/many.mp4", expected_frames=5), *batches(original_frames[:8], 0, 4)]))
    answer = stub.EncodeSegment(
        iter([header("counted/right.mp4", expected_frames=5), *batches(original_frames[:5], 0, 2)])
    )

    assert fewer.value.code() == more.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected 5 frames, got 4" in fewer.value.details()
    assert "expected 5 frames, got more (8 so far)" in more.value.details()
    assert answer.frames == 5
    assert files_under(media_root / "counted") == ["right.mp4"]


def test_join_checks_expected_frames_and_keeps_no_wrong_output(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    uris = []
    for n in range(2):
        requests = [header(f"checked/seg-{n}.mp4"), *batches(original_frames[n * 10 : (n + 1) * 10], n * 10, 5)]
        uris.append(stub.EncodeSegment(iter(requests)).output_uri)

    with pytest.raises(grpc.RpcError) as caught:
        stub.Join(encoder_pb2.JoinRequest(segment_uris=uris, output_uri="checked/out.mp4", expected_frames=21))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds 20 frames, expected 21" in caught.value.details()
    assert files_under(media_root / "checked") == ["seg-0.mp4", "seg-1.mp4"]

    joined = stub.Join(encoder_pb2.JoinRequest(segment_uris=uris, output_uri="checked/out.mp4", expected_frames=20))
    assert joined.frames == probe_media(media_root / "checked/out.mp4").frame_count == 20


def test_errors_show_only_the_start_of_a_long_uri(
    stub: encoder_pb2_grpc.EncoderServiceStub, original_frames: np.ndarray
) -> None:
    uri = "x" * 200 + "/" + "y" * 200 + "/seg.mp4"
    with pytest.raises(grpc.RpcError) as caught:
        stub.EncodeSegment(iter([header(uri, 160, 120), *batches(original_frames[:2], 0, 2)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the header says 160x120" in caught.value.details()
    assert "x" * 41 not in caught.value.details() and "yyy" not in caught.value.details()


def fed_stream(
    feed: queue.Queue[encoder_pb2.EncodeSegmentRequest | None],
) -> Iterator[encoder_pb2.EncodeSegmentRequest]:
    while (request := feed.get(timeout=60)) is not None:
        yield request


def test_a_stale_writer_and_its_successor_on_one_segment_both_finish_and_the_last_wins(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    folder = media_root / "released"
    stale_feed: queue.Queue[encoder_pb2.EncodeSegmentRequest | None] = queue.Queue()
    stale = stub.EncodeSegment.future(fed_stream(stale_feed))
    for request in [header("released/seg.mp4"), *batches(original_frames[:28], 0, 4)]:
        stale_feed.put(request)
    assert wait_until(functools.partial(holds_files, folder))

    newer = stub.EncodeSegment(iter([header("released/seg.mp4"), *batches(original_frames[:30], 0, 6)]))
    for request in batches(original_frames[28:32], 28, 4):
        stale_feed.put(request)
    stale_feed.put(None)

    assert (newer.frames, stale.result(timeout=30).frames) == (30, 32)
    assert files_under(folder) == ["seg.mp4"]
    assert probe_media(folder / "seg.mp4").frame_count == 32


def test_a_stale_writer_that_fails_leaves_its_successors_segment_in_place(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    folder = media_root / "superseded"
    stale_feed: queue.Queue[encoder_pb2.EncodeSegmentRequest | None] = queue.Queue()
    stale = stub.EncodeSegment.future(fed_stream(stale_feed))
    for request in [header("superseded/seg.mp4"), *batches(original_frames[:28], 0, 4)]:
        stale_feed.put(request)
    assert wait_until(functools.partial(holds_files, folder))

    newer = stub.EncodeSegment(iter([header("superseded/seg.mp4"), *batches(original_frames[:30], 0, 6)]))
    stale_feed.put(batches(np.ascontiguousarray(original_frames[28:30, :120, :160]), 28, 2)[0])
    stale_feed.put(None)

    assert stale.exception(timeout=30).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert newer.frames == 30
    assert files_under(folder) == ["seg.mp4"]
    assert probe_media(folder / "seg.mp4").frame_count == 30


def test_a_cancelled_call_stops_and_waits_for_its_thread_before_going_on() -> None:
    stop, started, release = threading.Event(), threading.Event(), threading.Event()
    finished: list[str] = []

    def work() -> str:
        started.set()
        assert stop.wait(30)
        # Clean-up after the stop; the cancellation must not go on before it is over.
        assert release.wait(30)
        finished.append("work")
        return "done"

    async def scenario() -> None:
        task = asyncio.create_task(in_thread_to_the_end(work, stop))
        assert await asyncio.to_thread(started.wait, 30)
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=0.5)
        assert not done and stop.is_set()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == ["work"]

    asyncio.run(scenario())


def test_segments_streamed_at_once_are_encoded_at_once_off_the_event_loop(
    stub: encoder_pb2_grpc.EncoderServiceStub, original_frames: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each segment's one write waits for the other's to start: serialised writes, or writes on the event
    # loop, would leave the first waiting alone until the barrier breaks.
    meeting = threading.Barrier(2, timeout=30)
    write = SegmentWriter.write
    writers: set[int] = set()

    def write_when_both_are_writing(writer: SegmentWriter, frames: np.ndarray) -> None:
        meeting.wait()
        writers.add(threading.get_ident())
        write(writer, frames)

    monkeypatch.setattr(SegmentWriter, "write", write_when_both_are_writing)
    calls = [
        stub.EncodeSegment.future(iter([header(f"parallel/seg-{n}.mp4"), *batches(original_frames[:10], 0, 10)]))
        for n in range(2)
    ]
    assert [call.result(timeout=60).frames for call in calls] == [10, 10]
    assert len(writers) == 2


def x264_threads(path: Path) -> int:
    """The thread count x264 wrote into the stream's settings message."""
    match = re.search(rb"x264 - core .*? threads=(\d+) ", path.read_bytes(), re.DOTALL)
    assert match, f"{path} holds no x264 settings message"
    return int(match.group(1))


def test_each_segment_gets_the_cores_shared_by_the_segments_open_when_it_starts(
    tmp_path: Path, original_frames: np.ndarray
) -> None:
    settings = encoder_settings(tmp_path)
    with serving(settings, [binding(settings, choose_backend("libx264"), cores=4)]) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        first_feed: queue.Queue[encoder_pb2.EncodeSegmentRequest | None] = queue.Queue()
        first = stub.EncodeSegment.future(fed_stream(first_feed))
        for request in [header("shared/first.mp4"), *batches(original_frames[:30], 0, 10)]:
            first_feed.put(request)
        # The first segment's file appears once x264 has output a frame: it is open, and counted.
        assert wait_until(functools.partial(holds_files, tmp_path / "shared"))
        second = stub.EncodeSegment(iter([header("shared/second.mp4"), *batches(original_frames[:10], 0, 10)]))
        first_feed.put(None)
        assert (first.result(timeout=60).frames, second.frames) == (30, 10)
        alone = stub.EncodeSegment(iter([header("shared/alone.mp4"), *batches(original_frames[:10], 0, 10)]))
        assert alone.frames == 10
    threads = {name: x264_threads(tmp_path / "shared" / f"{name}.mp4") for name in ("first", "second", "alone")}
    assert threads == {"first": 4, "second": 2, "alone": 4}


def test_an_explicit_thread_count_wins_over_the_share(tmp_path: Path, original_frames: np.ndarray) -> None:
    settings = encoder_settings(tmp_path, threads=3)
    with serving(settings, [binding(settings, choose_backend("libx264"), cores=16)]) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        stub.EncodeSegment(iter([header("fixed.mp4"), *batches(original_frames[:10], 0, 10)]))
    assert x264_threads(tmp_path / "fixed.mp4") == 3


def test_on_nvenc_the_servicer_writes_segments_that_join(
    tmp_path: Path, original_video: Path, original_frames: np.ndarray
) -> None:
    nvenc = FakeNvenc()
    settings = encoder_settings(tmp_path)
    (tmp_path / "original.mp4").write_bytes(original_video.read_bytes())
    with serving(settings, [binding(settings, BackendChoice("auto", "nvenc", "a session encoded", nvenc))]) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        uris = [
            stub.EncodeSegment(
                iter([header(f"gpu/seg-{n}.mp4", expected_frames=20), *batches(original_frames[n * 20 :][:20], 0, 8)])
            ).output_uri
            for n in range(2)
        ]
        joined = stub.Join(
            encoder_pb2.JoinRequest(
                segment_uris=uris, audio_source_uri="original.mp4", output_uri="gpu/out.mp4", expected_frames=40
            )
        )
    assert (joined.frames, joined.audio_copied) == (40, True)
    assert len(nvenc.sessions) == 2 and files_under(tmp_path / "gpu") == ["out.mp4", "seg-0.mp4", "seg-1.mp4"]
    error = np.abs(decoded_frames(tmp_path / "gpu/out.mp4").astype(np.int16) - original_frames[:40]).mean()
    assert error < 4.0


def as_nv12(frames: np.ndarray) -> np.ndarray:
    return np.stack([rgb_to_nv12(frame) for frame in frames])


def test_a_segment_streamed_as_nv12_batches_is_encoded(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    requests = [header("nv12/seg.mp4", expected_frames=20), *batches(as_nv12(original_frames[:20]), 0, 8)]
    assert all(request.frames.pixel_format == common_pb2.PIXEL_FORMAT_NV12 for request in requests[1:])
    answer = stub.EncodeSegment(iter(requests))
    assert (answer.output_uri, answer.frames) == ("nv12/seg.mp4", 20)
    info = probe_media(media_root / "nv12/seg.mp4")
    assert (info.frame_count, info.width, info.height) == (20, *SIZE)
    decoded = decoded_frames(media_root / "nv12/seg.mp4")
    assert decoded.shape == original_frames[:20].shape
    assert np.abs(decoded.astype(np.int16) - original_frames[:20].astype(np.int16)).mean() < 4.0


def test_a_segment_stream_that_changes_layout_is_invalid_and_leaves_nothing(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    requests = [header("switched/seg.mp4"), *batches(as_nv12(original_frames[:2]), 0, 2)]
    requests += batches(original_frames[2:4], 2, 2)
    with pytest.raises(grpc.RpcError) as caught:
        stub.EncodeSegment(iter(requests))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "was started with nv12 frames, got rgb24" in caught.value.details()
    assert files_under(media_root / "switched") == []


def test_an_nv12_batch_of_another_size_than_the_headers_is_invalid(
    stub: encoder_pb2_grpc.EncoderServiceStub, media_root: Path, original_frames: np.ndarray
) -> None:
    small = as_nv12(np.ascontiguousarray(original_frames[:2, :120, :160]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.EncodeSegment(iter([header("nv12-mismatch.mp4"), *batches(small, 0, 2)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frame batch is 160x120, the header says 320x240" in caught.value.details()
    assert not (media_root / "nv12-mismatch.mp4").exists()


def test_on_nvenc_the_servicer_encodes_nv12_batches(tmp_path: Path, original_frames: np.ndarray) -> None:
    nvenc = FakeNvenc()
    settings = encoder_settings(tmp_path)
    with serving(settings, [binding(settings, BackendChoice("auto", "nvenc", "a session encoded", nvenc))]) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        requests = [header("gpu/nv12.mp4", expected_frames=12), *batches(as_nv12(original_frames[:12]), 0, 5)]
        answer = stub.EncodeSegment(iter(requests))
    assert answer.frames == 12 and len(nvenc.sessions) == 1
    decoded = decoded_frames(tmp_path / "gpu/nv12.mp4")
    assert decoded.shape == original_frames[:12].shape
    assert np.abs(decoded.astype(np.int16) - original_frames[:12].astype(np.int16)).mean() < 4.0

"""Frames through a shared frame memory between the real decoder and encoder servicers and the worker's clients."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from services.cli import sample_media
from services.common.frames.frame_memory import DOMAIN_FILE, FrameMemory
from services.common.frames.frame_streams import decoder_stub, encoder_stub, register_decoder, register_encoder
from services.common.frames.frame_wire import SharedFrameRun
from services.common.media_probe import probe_media
from services.decoder.decode_backend import BackendChoice
from services.decoder.servicer import DecoderServicer
from services.decoder.settings import DecoderSettings
from services.encoder.encode_backend import BackendChoice as EncodeBackendChoice
from services.encoder.servicer import EncoderServicer
from services.encoder.settings import EncoderSettings
from services.worker.stage_clients import DecoderFrameSource, EncoderSegmentSink
from swapline.common.v1 import common_pb2
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from swapline.encoder.v1 import encoder_pb2
from tests.worker.aio_serving import serving

TIMEOUT_SECONDS = 10.0
MiB = 1024 * 1024
PYAV = BackendChoice("cpu", "cpu", "test")
X264 = EncodeBackendChoice("libx264", "libx264", "test")
FRAMES = 50


class RecordingMemory(FrameMemory):
    """A frame memory that counts the batches taken through it."""

    def __init__(self, directory: Path, budget_bytes: int) -> None:
        super().__init__(directory, budget_bytes)
        self.taken = 0

    def take(self, name: str, count: int, frame_shape: Sequence[int]) -> np.ndarray:
        frames = super().take(name, count, frame_shape)
        self.taken += 1
        return frames


def left_files(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir() if path.name != DOMAIN_FILE]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frame-memory-media")
    sample_media.make_face_video(
        root / "clip.mp4", sample_media.astronaut_photo(), seconds=2.0, size=(320, 240), fps=25, keyframe_seconds=1.0
    )
    return root


def decoder(media_root: Path, memory: FrameMemory | None) -> DecoderServicer:
    settings = DecoderSettings(media_root=media_root, transport_security="plaintext", auth_mode="open")
    return DecoderServicer(settings, PYAV, frame_memory=memory)


def decode_all(media_root: Path, served: FrameMemory | None, receiving: FrameMemory | None) -> np.ndarray:
    async def body(channel: grpc.aio.Channel) -> np.ndarray:
        source = DecoderFrameSource(
            decoder_stub(channel), "clip.mp4", 0, 0, FRAMES, 8, TIMEOUT_SECONDS, "nv12", memory=receiving
        )
        return np.concatenate([frames async for frames, _ in source])

    return asyncio.run(serving(lambda server: register_decoder(decoder(media_root, served), server), body, 30))


def test_decoded_frames_through_the_frame_memory_equal_those_in_the_messages(media_root: Path, tmp_path: Path) -> None:
    inline = decode_all(media_root, None, None)
    receiving = RecordingMemory(tmp_path, 0)
    shared = decode_all(media_root, FrameMemory(tmp_path, 64 * MiB), receiving)
    assert shared.shape == inline.shape == (FRAMES, 360, 320)
    assert np.array_equal(shared, inline)
    assert receiving.taken == 7  # 50 frames in batches of 8
    assert left_files(tmp_path) == []


def test_a_decoder_on_another_directory_sends_frames_in_the_messages(media_root: Path, tmp_path: Path) -> None:
    receiving = RecordingMemory(tmp_path / "worker", 0)
    frames = decode_all(media_root, FrameMemory(tmp_path / "decoder", 64 * MiB), receiving)
    assert len(frames) == FRAMES and receiving.taken == 0
    assert left_files(tmp_path / "decoder") == []


class WritesAheadDecoder(decoder_pb2_grpc.DecoderServiceServicer):
    """Writes every batch into the frame memory before it sends the first, as a decoder ahead of its caller."""

    def __init__(self, memory: FrameMemory) -> None:
        self._memory = memory

    async def Decode(self, request: decoder_pb2.DecodeRequest, context: Any) -> AsyncIterator[SharedFrameRun]:
        names = [self._memory.put(np.full((2, 6, 4), 9, np.uint8), request.frame_memory_tag) for _ in range(3)]
        for batch, name in enumerate(names):
            assert name is not None
            yield SharedFrameRun(name, "nv12", 4, 4, [2 * batch, 2 * batch + 1])


def test_a_worker_that_stops_reading_removes_the_files_it_did_not_take(tmp_path: Path) -> None:
    memory = FrameMemory(tmp_path, 64 * MiB)

    async def body(channel: grpc.aio.Channel) -> None:
        source = DecoderFrameSource(decoder_stub(channel), "clip.mp4", 0, 0, 6, 2, TIMEOUT_SECONDS, memory=memory)
        batches = aiter(source)
        await anext(batches)
        await batches.aclose()  # type: ignore[attr-defined]

    asyncio.run(serving(lambda server: register_decoder(WritesAheadDecoder(memory), server), body))
    assert left_files(tmp_path) == []


def test_a_decode_call_that_ends_early_removes_the_files_it_wrote(media_root: Path, tmp_path: Path) -> None:
    memory = FrameMemory(tmp_path, 64 * MiB)
    request = decoder_pb2.DecodeRequest(
        uri="clip.mp4",
        frame_count=FRAMES,
        batch_size=8,
        pixel_format=common_pb2.PIXEL_FORMAT_NV12,
        frame_memory_domain=memory.domain,
        frame_memory_tag="call",
    )

    async def first_then_cancel() -> Any:
        calls = decoder(media_root, memory).Decode(request, None)
        first = await anext(calls)
        assert left_files(tmp_path)
        await calls.aclose()  # type: ignore[attr-defined]
        return first

    assert isinstance(asyncio.run(first_then_cancel()), SharedFrameRun)
    assert left_files(tmp_path) == [] and memory.pending_bytes == 0


def encode(media_root: Path, served: FrameMemory | None, sending: FrameMemory) -> tuple[int, bool]:
    settings = EncoderSettings(media_root=media_root, transport_security="plaintext", auth_mode="open", threads=1)
    frames = np.random.default_rng(3).integers(16, 235, (4, 360, 320), dtype=np.uint8)

    async def body(channel: grpc.aio.Channel) -> tuple[int, bool]:
        header = encoder_pb2.SegmentHeader(output_uri="segments/shared.mp4", fps=25, width=320, height=240)
        async with EncoderSegmentSink(encoder_stub(channel), header, TIMEOUT_SECONDS, memory=sending) as sink:
            # Frames go in the messages until the encoder's metadata has arrived; the switch is what is tested.
            while served is not None and not sink.sends_through_frame_memory:
                await sink.write(frames)
            for _ in range(2):
                await sink.write(frames)
            return await sink.close(), sink.sends_through_frame_memory

    return asyncio.run(
        serving(lambda server: register_encoder(EncoderServicer(settings, X264, 2, served), server), body, 30)
    )


def test_segment_frames_through_the_frame_memory_are_encoded_and_their_files_go(
    media_root: Path, tmp_path: Path
) -> None:
    served = RecordingMemory(tmp_path, 0)
    written, shared = encode(media_root, served, FrameMemory(tmp_path, 64 * MiB))
    assert shared and served.taken == 2
    assert probe_media(media_root / "segments/shared.mp4").frame_count == written
    assert written % 4 == 0 and written >= 8
    assert left_files(tmp_path) == []


def test_an_encoder_without_a_frame_memory_gets_frames_in_the_messages(media_root: Path, tmp_path: Path) -> None:
    written, shared = encode(media_root, None, FrameMemory(tmp_path, 64 * MiB))
    assert (written, shared) == (8, False)
    assert left_files(tmp_path) == []


class HeldMemory(FrameMemory):
    """A frame memory whose writes, once begun (`entered`), wait for `release` before they write their file."""

    def __init__(self, directory: Path, budget_bytes: int) -> None:
        super().__init__(directory, budget_bytes)
        self.entered, self.release = threading.Event(), threading.Event()

    def put(self, frames: np.ndarray, tag: str = "") -> str | None:
        self.entered.set()
        self.release.wait(TIMEOUT_SECONDS)
        return super().put(frames, tag)


def test_a_segment_write_cancelled_while_its_file_is_written_leaves_no_file(media_root: Path, tmp_path: Path) -> None:
    settings = EncoderSettings(media_root=media_root, transport_security="plaintext", auth_mode="open", threads=1)
    sending = HeldMemory(tmp_path, 64 * MiB)
    frames = np.zeros((2, 360, 320), np.uint8)
    sending.release.set()  # the writes before the encoder's metadata arrives go in the messages anyway

    async def body(channel: grpc.aio.Channel) -> None:
        header = encoder_pb2.SegmentHeader(output_uri="segments/cancelled.mp4", fps=25, width=320, height=240)
        async with EncoderSegmentSink(encoder_stub(channel), header, TIMEOUT_SECONDS, memory=sending) as sink:
            while not sink.sends_through_frame_memory:
                await sink.write(frames)
            sending.release.clear()
            sending.entered.clear()
            write = asyncio.ensure_future(sink.write(frames))
            assert await asyncio.to_thread(sending.entered.wait, TIMEOUT_SECONDS)
            write.cancel()
            sending.release.set()
            with contextlib.suppress(asyncio.CancelledError):
                await write

    served = FrameMemory(tmp_path, 0)
    asyncio.run(serving(lambda server: register_encoder(EncoderServicer(settings, X264, 2, served), server), body, 30))
    assert left_files(tmp_path) == []

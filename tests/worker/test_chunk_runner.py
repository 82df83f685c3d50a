from __future__ import annotations

import asyncio
import typing
from collections.abc import Sequence
from typing import Any

import pytest

from services.common.errors import ResourceExhausted
from services.common.residency_client import LoadOutcome
from services.worker.arcface_embedder import ArcFaceEmbedder
from services.worker.chunk_pipeline import HOST_WARPER, ChunkStats
from services.worker.chunk_runner import ChunkRunner, StageStubs, chunk_stats_to_proto, segment_header
from services.worker.face_swapper import HOST_CROPS
from services.worker.settings import WorkerSettings
from services.worker.source_face import JobFaceCache
from services.worker.swapper_registry import SwapperRegistry
from swapline.chunks.v1 import chunks_pb2
from swapline.encoder.v1 import encoder_pb2


def test_the_segment_header_has_the_encoder_check_the_chunks_frame_count() -> None:
    lease = chunks_pb2.ChunkLease(
        segment_uri="jobs/j1/segments/3.mp4",
        fps=25.0,
        width=64,
        height=48,
        start_frame=120,
        frame_count=37,
        encode=encoder_pb2.EncodeSettings(crf=20, preset="fast"),
    )

    header = segment_header(lease)

    assert header.expected_frames == 37
    assert (header.output_uri, header.fps, header.width, header.height) == ("jobs/j1/segments/3.mp4", 25.0, 64, 48)
    assert (header.settings.crf, header.settings.preset) == (20, "fast")


def test_chunk_stats_report_the_frames_and_faces_of_the_run() -> None:
    stats = ChunkStats()
    for index, faces in ((120, 1), (121, 1), (122, 0)):
        stats.record_frame(index, faces)
    stats.fp32_fallbacks = 3

    message = chunk_stats_to_proto(stats)
    assert message.fp32_fallbacks == 3

    assert (message.frames, message.faces, message.frames_with_faces) == (3, 2, 2)
    assert [(change.frame_index, change.faces) for change in message.face_count_changes] == [(120, 1), (122, 0)]


class _UnusedStub:
    """Any call on it fails the test: the chunk must stop before a stage is asked anything."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"stage stub called: {name}")


class _Residency:
    def __init__(self, error: Exception | None = None) -> None:
        self.asked: list[tuple[str, ...]] = []
        self.error = error

    async def ensure_loaded(self, models: Sequence[str]) -> LoadOutcome:
        self.asked.append(tuple(models))
        if self.error is not None:
            raise self.error
        return LoadOutcome((), ())


def test_a_chunk_asks_for_its_jobs_imported_models_before_any_stage() -> None:
    settings = WorkerSettings(
        gateway_target="gateway:1",
        decoder_target="decoder:1",
        detector_target="detector:1",
        encoder_target="encoder:1",
        triton_url="triton:1",
    )
    unused = typing.cast(Any, _UnusedStub())
    residency = _Residency(ResourceExhausted("models inswapper_128 ... exceed the budget"))
    swappers = SwapperRegistry(unused, unused, unused, HOST_CROPS, ArcFaceEmbedder(unused, unused))
    runner = ChunkRunner(
        settings,
        StageStubs(unused, unused, unused),
        swappers,
        unused,
        typing.cast(Any, residency),
        JobFaceCache(),
        HOST_WARPER,
    )
    lease = chunks_pb2.ChunkLease(job_id="j1", swapper="inswapper_128", detector="yoloface_8n")
    with pytest.raises(ResourceExhausted, match="exceed the budget"):
        asyncio.run(runner.run(lease, ChunkStats()))
    assert residency.asked == [
        (
            "inswapper_128",
            "inswapper_128_fp32",
            "inswapper_128_source",
            "arcface_w600k_r50",
            "yoloface_8n",
            "yoloface_8n_fp32",
        )
    ]

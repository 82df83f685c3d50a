"""Builders and stand-ins shared by the gateway tests: a manual clock, records, in-memory media services."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import SwaplineError
from services.common.media_info import Keyframe, MediaInfo
from services.common.tenant_context import LOCAL_TENANT
from services.gateway.job_images import source_image_uri
from services.gateway.job_records import (
    EncodeOptions,
    JobRecord,
    JobState,
    JoinOutcome,
    PlannedChunk,
)
from services.gateway.job_store import JobStore


class ManualClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def video_target(frame_count: int = 100, fps: float = 25.0, has_audio: bool = True) -> MediaInfo:
    return MediaInfo(
        kind="video",
        duration_seconds=frame_count / fps,
        fps=fps,
        frame_count=frame_count,
        width=64,
        height=48,
        has_audio=has_audio,
        keyframes=tuple(Keyframe(index, index * 100) for index in range(0, frame_count, 25)),
    )


def job_record(
    job_id: str,
    created_at: float,
    state: JobState = "QUEUED",
    target: MediaInfo | None = None,
    tenant: str = LOCAL_TENANT,
) -> JobRecord:
    target = target or video_target()
    return JobRecord(
        id=job_id,
        tenant=tenant,
        state=state,
        selector="one",
        target_uri=f"{job_id}.mp4",
        output_uri=f"outputs/{job_id}/output.mp4",
        source_image_uri=source_image_uri(job_id),
        reference_image_uri="",
        encode=EncodeOptions(crf=20, preset="fast"),
        target=target,
        frames_total=target.frame_count,
        chunks_total=0,
        created_at=created_at,
    )


def planned_chunks(job_id: str, sizes: Sequence[int]) -> list[PlannedChunk]:
    chunks, start = [], 0
    for index, size in enumerate(sizes):
        chunks.append(PlannedChunk(index, start, start * 100, size, f"work/{job_id}/chunk-{index:05d}.mp4"))
        start += size
    return chunks


@dataclass
class FakeMedia:
    """In-memory MediaServices for the queue tests: records joins, fails them on request."""

    # Raised by the next joins, one each, in order.
    join_errors: list[SwaplineError] = field(default_factory=list)
    frames_joined: int = 100
    joins: list[tuple[list[str], str, str]] = field(default_factory=list)
    expected_frames: list[int] = field(default_factory=list)

    async def probe(self, uri: str) -> MediaInfo:
        raise AssertionError("the queue never probes")

    async def count_faces(self, image_rgb: np.ndarray) -> int:
        raise AssertionError("the queue never detects")

    async def join(
        self, segment_uris: Sequence[str], audio_source_uri: str, output_uri: str, expected_frames: int
    ) -> JoinOutcome:
        self.joins.append((list(segment_uris), audio_source_uri, output_uri))
        self.expected_frames.append(expected_frames)
        if self.join_errors:
            raise self.join_errors.pop(0)
        return JoinOutcome(output_uri, self.frames_joined, bool(audio_source_uri), 0.25)

    async def close(self) -> None:
        return None


def job_of(store: JobStore, lease_id: str) -> str:
    """The job whose chunk `lease_id` holds, as the chunk queue knows it when a heartbeat comes."""
    chunk = store.chunk_for_lease(lease_id)
    assert chunk is not None
    return chunk.job_id

"""JobService and ChunkQueueService through real gRPC, against stand-ins for decoder, detector, encoder."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from skimage import data as skimage_data

from services.common.errors import InvalidArgument, code_value
from services.common.frames.frame_codec import unpack_frames
from services.common.grpc_channel import PLAINTEXT, ChannelSecurity, StaticToken, open_channel
from services.common.grpc_server import ServiceBinding, start_server
from services.common.image_codec import decode_rgb_image
from services.common.media_paths import existing_media_path, writable_media_path
from services.common.server_settings import ServerSettings
from services.gateway import job_intake
from services.gateway.gateway_parts import GatewayParts, assemble_gateway
from services.gateway.gpu_trend_source import GpuTrendSource, TrendRow
from services.gateway.job_records import EncodeOptions
from services.gateway.job_store import SqliteJobStore
from services.gateway.media_clients import GrpcMediaServices
from services.gateway.settings import GatewaySettings
from swapline.chunks.v1 import chunks_pb2, chunks_pb2_grpc
from swapline.common.v1 import common_pb2
from swapline.decoder.v1 import decoder_pb2, decoder_pb2_grpc
from swapline.detector.v1 import detector_pb2, detector_pb2_grpc
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from swapline.jobs.v1 import jobs_pb2, jobs_pb2_grpc

VIDEO_FRAMES = 100
VIDEO_FPS = 25.0
MAX_UPLOAD_BYTES = 4096


class FakeDecoder(decoder_pb2_grpc.DecoderServiceServicer):
    """Checks paths like the real decoder; describes every file as a 4 s, 25 fps clip with audio."""

    def __init__(self, media_root: Path) -> None:
        self.media_root = media_root

    async def Probe(self, request: decoder_pb2.ProbeRequest, context: object) -> decoder_pb2.ProbeResponse:
        path = existing_media_path(self.media_root, request.uri)
        if path.read_bytes().startswith(b"garbage"):
            raise InvalidArgument(f"{request.uri!r} holds no decodable media")
        info = decoder_pb2.MediaInfo(
            kind=decoder_pb2.MEDIA_KIND_VIDEO,
            duration_seconds=VIDEO_FRAMES / VIDEO_FPS,
            fps=VIDEO_FPS,
            frame_count=VIDEO_FRAMES,
            width=64,
            height=48,
            has_audio=True,
            keyframes=[decoder_pb2.Keyframe(frame_index=i, pts=i * 512) for i in range(0, VIDEO_FRAMES, 25)],
        )
        return decoder_pb2.ProbeResponse(info=info)


@dataclass
class FakeDetector(detector_pb2_grpc.DetectorServiceServicer):
    """A textured picture has a face, a flat one has none: enough to drive the gateway's checks."""

    sizes: list[tuple[int, int]] = field(default_factory=list)
    # Set: each call waits this long for `release`, so calls that the gateway lets overlap do overlap.
    hold_seconds: float = 0.0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    most_active: int = 0

    async def Detect(self, request: detector_pb2.DetectRequest, context: object) -> detector_pb2.DetectResponse:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.hold_seconds:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), self.hold_seconds)
            return self._answer(request)
        finally:
            self.active -= 1

    def _answer(self, request: detector_pb2.DetectRequest) -> detector_pb2.DetectResponse:
        frames, indices, _ = unpack_frames(request.frames)
        response = detector_pb2.DetectResponse()
        for frame, index in zip(frames, indices, strict=True):
            self.sizes.append((frame.shape[0], frame.shape[1]))
            faces = [common_pb2.Face(box=common_pb2.BoundingBox(x1=1, y1=1, x2=9, y2=9), score=0.99)]
            response.frames.add(frame_index=index, faces=faces if frame.std() > 10 else [])
        return response


@dataclass
class FakeEncoder(encoder_pb2_grpc.EncoderServiceServicer):
    """Joins by concatenating the segment files: the output's bytes show which segments went in, in order."""

    media_root: Path
    joins: list[encoder_pb2.JoinRequest] = field(default_factory=list)

    async def Join(self, request: encoder_pb2.JoinRequest, context: object) -> encoder_pb2.JoinResponse:
        self.joins.append(request)
        parts = [existing_media_path(self.media_root, uri).read_bytes() for uri in request.segment_uris]
        writable_media_path(self.media_root, request.output_uri).write_bytes(b"".join(parts))
        return encoder_pb2.JoinResponse(
            output_uri=request.output_uri,
            frames=VIDEO_FRAMES,
            audio_copied=bool(request.audio_source_uri),
            join_seconds=0.01,
        )


# Tokens of the gateway under test: two tenants besides the local one, and the workers' internal token.
TENANT_TOKENS = {"local": "token-of-local", "acme": "token-of-acme", "globex": "token-of-globex"}
INTERNAL_TOKEN = "internal-token-of-the-workers"


@dataclass
class Gateway:
    jobs: jobs_pb2_grpc.JobServiceStub
    queue: chunks_pb2_grpc.ChunkQueueServiceStub
    parts: GatewayParts
    detector: FakeDetector
    encoder: FakeEncoder
    media_root: Path
    address: str
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def jobs_as(self, tenant: str) -> jobs_pb2_grpc.JobServiceStub:
        """The JobService as the tenant's client sees it; "internal" for a swapline service."""
        token = INTERNAL_TOKEN if tenant == "internal" else TENANT_TOKENS[tenant]
        self.channels.append(open_channel(self.address, ChannelSecurity(token=StaticToken(token))))
        return jobs_pb2_grpc.JobServiceStub(self.channels[-1])


@asynccontextmanager
async def running_gateway(
    tmp_path: Path, gpu_source: GpuTrendSource | None = None, **settings_overrides: Any
) -> AsyncIterator[Gateway]:
    media_root = tmp_path / "media"
    media_root.mkdir()
    detector, encoder = FakeDetector(), FakeEncoder(media_root)
    fakes = await start_server(
        ServerSettings(port=0, metrics_port=-1, transport_security="plaintext", auth_mode="open"),
        [
            ServiceBinding(FakeDecoder(media_root), decoder_pb2_grpc.add_DecoderServiceServicer_to_server, "d"),
            ServiceBinding(detector, detector_pb2_grpc.add_DetectorServiceServicer_to_server, "f"),
            ServiceBinding(encoder, encoder_pb2_grpc.add_EncoderServiceServicer_to_server, "e"),
        ],
    )
    fakes_target = f"127.0.0.1:{fakes.port}"
    tokens_file, internal_token_file = tmp_path / "tenant-tokens", tmp_path / "internal-token"
    tokens_file.write_text("".join(f"{token} {tenant}\n" for tenant, token in TENANT_TOKENS.items()))
    internal_token_file.write_text(INTERNAL_TOKEN)
    settings = GatewaySettings(
        media_root=media_root,
        decoder_target=fakes_target,
        detector_target=fakes_target,
        encoder_target=fakes_target,
        chunk_seconds=1.0,
        max_upload_bytes=MAX_UPLOAD_BYTES,
        port=0,
        metrics_port=-1,
        transport_security="plaintext",
        auth_mode="token",
        tenant_tokens_file=tokens_file,
        internal_token_file=internal_token_file,
        gpu_trend_source="none" if gpu_source is None else "trend_log",
        **settings_overrides,
    )
    store = SqliteJobStore(":memory:", media_root)
    media = GrpcMediaServices(fakes_target, fakes_target, fakes_target, 10.0, 10.0, PLAINTEXT)
    parts = assemble_gateway(settings, store, media, gpu_source=gpu_source)
    server = await start_server(settings, parts.bindings())
    address = f"127.0.0.1:{server.port}"
    worker_channel = open_channel(
        f"127.0.0.1:{server.internal_port}", ChannelSecurity(token=StaticToken(INTERNAL_TOKEN))
    )
    gateway = Gateway(
        jobs_pb2_grpc.JobServiceStub(worker_channel),
        chunks_pb2_grpc.ChunkQueueServiceStub(worker_channel),
        parts,
        detector,
        encoder,
        media_root,
        address,
        [worker_channel],
    )
    # The local tenant's client, as `swapline` with SWAPLINE_TOKEN set.
    gateway.jobs = gateway.jobs_as("local")
    try:
        yield gateway
    finally:
        for channel in gateway.channels:
            await channel.close()
        await server.stop(None)
        await parts.coordinator.wait_for_joins()
        await fakes.server.stop(None)
        await media.close()
        store.close()


def run(
    tmp_path: Path,
    scenario: Callable[[Gateway], Awaitable[None]],
    gpu_source: GpuTrendSource | None = None,
    **settings_overrides: Any,
) -> None:
    async def main() -> None:
        async with running_gateway(tmp_path, gpu_source, **settings_overrides) as gateway:
            await asyncio.wait_for(scenario(gateway), timeout=30.0)

    asyncio.run(main())


def encoded(image_rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buffer.tobytes()


@pytest.fixture(scope="module")
def face_jpeg() -> bytes:
    # Upscaled past the detector's 640-pixel budget, so the gateway must downscale it.
    return encoded(cv2.resize(skimage_data.astronaut(), (1024, 896)))


FLAT_JPEG = encoded(np.full((120, 100, 3), 128, np.uint8))


def submit_messages(spec: jobs_pb2.JobSpec, pieces: Sequence[bytes] = ()) -> list[jobs_pb2.SubmitJobRequest]:
    return [jobs_pb2.SubmitJobRequest(spec=spec)] + [jobs_pb2.SubmitJobRequest(target_chunk=p) for p in pieces]


async def submit_expecting(
    gateway: Gateway, messages: list[jobs_pb2.SubmitJobRequest], code: grpc.StatusCode, text: str
) -> jobs_pb2.Job:
    """Submits, expects the status, and returns the recorded job named in the message."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await gateway.jobs.SubmitJob(iter(messages))
    assert failure.value.code() == code, failure.value.details()
    details = failure.value.details() or ""
    assert text in details
    match = re.match(r"job (\w+): ", details)
    assert match, details
    job = await gateway.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=match.group(1)))
    assert job.state == jobs_pb2.JOB_STATE_FAILED
    assert job.error.code == code_value(code) and text in job.error.message
    return job


def test_missing_target_is_not_found(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="missing.mp4")
        job = await submit_expecting(gateway, submit_messages(spec), grpc.StatusCode.NOT_FOUND, "does not exist")
        listed = await gateway.jobs.ListJobs(jobs_pb2.ListJobsRequest(state=jobs_pb2.JOB_STATE_FAILED))
        assert [listed_job.id for listed_job in listed.jobs] == [job.id]

    run(tmp_path, scenario)


def test_target_outside_the_media_root_is_permission_denied(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="../x")
        await submit_expecting(gateway, submit_messages(spec), grpc.StatusCode.PERMISSION_DENIED, "outside")

    run(tmp_path, scenario)


def test_undecodable_target_keeps_the_decoders_invalid_argument(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "broken.mp4").write_bytes(b"garbage")
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="broken.mp4")
        await submit_expecting(gateway, submit_messages(spec), grpc.StatusCode.INVALID_ARGUMENT, "no decodable")

    run(tmp_path, scenario)


def test_zero_byte_upload_is_invalid(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_filename="clip.mp4")
        job = await submit_expecting(
            gateway,
            submit_messages(spec, [b""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "uploaded target is empty",
        )
        assert not (gateway.media_root / "uploads" / job.id).exists()

    run(tmp_path, scenario)


def test_oversized_upload_is_refused(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_filename="clip.mp4")
        pieces = [b"x" * 1500] * 3
        await submit_expecting(
            gateway, submit_messages(spec, pieces), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"
        )

    run(tmp_path, scenario)


def test_source_without_a_face_fails_the_precondition(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        spec = jobs_pb2.JobSpec(source_image=FLAT_JPEG, target_uri="clip.mp4")
        await submit_expecting(
            gateway,
            submit_messages(spec),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no face found in the source image",
        )

    run(tmp_path, scenario)


def test_reference_selector_needs_a_reference_with_a_face(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        reference = jobs_pb2.FACE_SELECTOR_MODE_REFERENCE
        missing = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4", selector=reference)
        await submit_expecting(gateway, submit_messages(missing), grpc.StatusCode.INVALID_ARGUMENT, "reference_image")
        faceless = jobs_pb2.JobSpec(
            source_image=face_jpeg, target_uri="clip.mp4", selector=reference, reference_image=FLAT_JPEG
        )
        await submit_expecting(
            gateway,
            submit_messages(faceless),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no face found in the reference",
        )

    run(tmp_path, scenario)


def test_bad_source_and_a_missing_spec_are_invalid(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        spec = jobs_pb2.JobSpec(source_image=b"not an image", target_uri="clip.mp4")
        await submit_expecting(gateway, submit_messages(spec), grpc.StatusCode.INVALID_ARGUMENT, "source image")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gateway.jobs.SubmitJob(iter([jobs_pb2.SubmitJobRequest(target_chunk=b"abc")]))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "spec" in (failure.value.details() or "")

    run(tmp_path, scenario)


def test_upload_is_stored_under_a_sanitised_name(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        pieces = [b"first-", b"second-", b"third"]
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_filename="../../my clip.mp4")
        job = await gateway.jobs.SubmitJob(iter(submit_messages(spec, pieces)))
        assert job.state == jobs_pb2.JOB_STATE_QUEUED
        assert job.target_uri == f"uploads/{job.id}/my_clip.mp4"
        assert (gateway.media_root / job.target_uri).read_bytes() == b"".join(pieces)
        assert job.selector == jobs_pb2.FACE_SELECTOR_MODE_ONE
        assert (job.frames_total, job.chunks_total) == (VIDEO_FRAMES, 4)

    run(tmp_path, scenario)


def test_a_burst_of_submissions_takes_turns_at_the_image_checks(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        gateway.detector.hold_seconds = 0.5
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_filename="clip.mp4")
        jobs = await asyncio.gather(
            *(gateway.jobs.SubmitJob(iter(submit_messages(spec, [b"video"]))) for _ in range(6))
        )
        assert [job.state for job in jobs] == [jobs_pb2.JOB_STATE_QUEUED] * 6
        assert gateway.detector.most_active == 2

    run(tmp_path, scenario, max_concurrent_image_checks=2)


def test_unknown_jobs_are_not_found_everywhere(tmp_path: Path) -> None:
    async def scenario(gateway: Gateway) -> None:
        calls = [
            gateway.jobs.GetJob(jobs_pb2.GetJobRequest(job_id="nope")),
            gateway.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id="nope")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        streams = [
            gateway.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id="nope")),
            gateway.jobs.FetchArtifact(jobs_pb2.FetchArtifactRequest(job_id="nope", artifact=jobs_pb2.ARTIFACT_OUTPUT)),
        ]
        for stream in streams:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for _ in stream:
                    pass
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND

    run(tmp_path, scenario)


def test_cancel_a_queued_job_then_it_is_finished(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        job = await gateway.jobs.SubmitJob(
            iter(submit_messages(jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4")))
        )
        fetch = gateway.jobs.FetchArtifact(
            jobs_pb2.FetchArtifactRequest(job_id=job.id, artifact=jobs_pb2.ARTIFACT_OUTPUT)
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in fetch:
                pass
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        cancelled = await gateway.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id))
        assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED and cancelled.report_json
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await gateway.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id))
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        lease = await gateway.queue.LeaseChunk(chunks_pb2.LeaseChunkRequest(worker_id="w", wait_seconds=0))
        assert not lease.has_lease

    run(tmp_path, scenario)


async def fetch_all(gateway: Gateway, job_id: str, artifact: jobs_pb2.Artifact) -> tuple[bytes, str, int]:
    pieces, filename, total = [], "", -1
    async for piece in gateway.jobs.FetchArtifact(jobs_pb2.FetchArtifactRequest(job_id=job_id, artifact=artifact)):
        pieces.append(piece.data)
        filename, total = piece.filename, piece.total_size
    return b"".join(pieces), filename, total


def test_happy_path_from_submit_to_artifacts(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        spec = jobs_pb2.JobSpec(
            source_image=face_jpeg,
            target_uri="clip.mp4",
            selector=jobs_pb2.FACE_SELECTOR_MODE_MANY,
            encode=encoder_pb2.EncodeSettings(crf=18, preset="fast"),
        )
        job = await gateway.jobs.SubmitJob(iter(submit_messages(spec)))
        assert job.state == jobs_pb2.JOB_STATE_QUEUED and job.chunks_total == 4
        assert max(max(size) for size in gateway.detector.sizes) <= 640

        watch = gateway.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id))
        first = await watch.read()
        assert first.state == jobs_pb2.JOB_STATE_QUEUED and first.eta_seconds < 0
        events: list[jobs_pb2.JobEvent] = [first]
        arrived = asyncio.Condition()

        async def collect() -> None:
            while (event := await watch.read()) is not grpc.aio.EOF:
                async with arrived:
                    events.append(event)
                    arrived.notify_all()

        async def first_event(stage: str, frames_done: int) -> jobs_pb2.JobEvent:
            def matches(event: jobs_pb2.JobEvent) -> bool:
                return event.stage == stage and event.frames_done == frames_done

            async with arrived:
                await arrived.wait_for(lambda: any(matches(e) for e in events))
            return next(e for e in events if matches(e))

        collector = asyncio.create_task(collect())
        segments = []
        while True:
            response = await gateway.queue.LeaseChunk(chunks_pb2.LeaseChunkRequest(worker_id="w", wait_seconds=0))
            if not response.has_lease:
                break
            lease = response.lease
            assert (lease.job_id, lease.target_uri, lease.fps, lease.width, lease.height) == (
                job.id,
                "clip.mp4",
                VIDEO_FPS,
                64,
                48,
            )
            assert lease.source_image == face_jpeg and lease.selector == jobs_pb2.FACE_SELECTOR_MODE_MANY
            assert (lease.encode.crf, lease.encode.preset, lease.attempt) == (18, "fast", 1)
            assert lease.segment_uri == f"work/{job.id}/chunk-{lease.chunk_index:05d}-a1.mp4"
            half = lease.frame_count // 2
            beat = await gateway.queue.Heartbeat(
                chunks_pb2.HeartbeatRequest(lease_id=lease.lease_id, frames_done=half, stage="swap", faces=half)
            )
            assert not beat.stop
            if lease.chunk_index == 0:
                progress = await first_event("swap", half)
                assert progress.state == jobs_pb2.JOB_STATE_RUNNING and progress.fps > 0 and progress.eta_seconds > 0
            segment = f"segment-{lease.chunk_index};".encode()
            segments.append(segment)
            writable_media_path(gateway.media_root, lease.segment_uri).write_bytes(segment)
            now = time.time()
            stats = chunks_pb2.ChunkStats(
                frames=lease.frame_count,
                faces=lease.frame_count,
                frames_with_faces=lease.frame_count,
                stage_seconds={"swap": 0.2, "detect": 0.1},
                started_at_unix=now - 0.3,
                finished_at_unix=now,
            )
            await gateway.queue.CompleteChunk(
                chunks_pb2.CompleteChunkRequest(lease_id=lease.lease_id, segment_uri=lease.segment_uri, stats=stats)
            )
        assert len(segments) == 4

        await asyncio.wait_for(collector, timeout=10.0)
        assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert (events[-1].frames_done, events[-1].chunks_done) == (VIDEO_FRAMES, 4)
        assert all(e.state != jobs_pb2.JOB_STATE_SUCCEEDED for e in events[:-1])
        frames_seen = [event.frames_done for event in events]
        assert frames_seen == sorted(frames_seen)

        done = await gateway.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and done.output_uri == f"outputs/{job.id}/output.mp4"
        join = gateway.encoder.joins[-1]
        assert list(join.segment_uris) == [f"work/{job.id}/chunk-{i:05d}-a1.mp4" for i in range(4)]
        assert join.audio_source_uri == "clip.mp4" and join.expected_frames == VIDEO_FRAMES

        output, filename, total = await fetch_all(gateway, job.id, jobs_pb2.ARTIFACT_OUTPUT)
        assert output == b"".join(segments) and filename == "output.mp4" and total == len(output)
        report_bytes, report_name, _ = await fetch_all(gateway, job.id, jobs_pb2.ARTIFACT_REPORT)
        assert report_name == "report.json" and report_bytes.decode() == done.report_json
        report = json.loads(done.report_json)
        assert report["frames"] == VIDEO_FRAMES and report["chunks"] == 4 and report["output"]["audio_copied"]
        assert report["selector"] == "many"
        assert sum(1 for event in report["events"] if event["kind"] == "chunk_end") == 4

    run(tmp_path, scenario)


@dataclass
class BusyGpuSource:
    """One GPU sampled every second around now at 78 %, 5 GB used: a trend log beside a busy GPU."""

    utilization: float = 78.0
    memory_used: float = 5e9

    def sample(self, second: int) -> TrendRow:
        return TrendRow(
            float(second), "n1", 0, "GPU-0", "NVIDIA L4", self.utilization, self.memory_used, 24e9, 60.0, 70.0
        )

    async def window(self, start: float, end: float) -> list[TrendRow]:
        return [self.sample(second) for second in range(math.ceil(start), math.floor(end) + 1)]

    async def latest(self) -> list[TrendRow]:
        return [self.sample(math.floor(time.time()))]


async def lease_and_beat(gateway: Gateway) -> chunks_pb2.ChunkLease | None:
    response = await gateway.queue.LeaseChunk(chunks_pb2.LeaseChunkRequest(worker_id="w"))
    if not response.has_lease:
        return None
    await gateway.queue.Heartbeat(
        chunks_pb2.HeartbeatRequest(lease_id=response.lease.lease_id, frames_done=1, stage="swap", faces=1)
    )
    return response.lease


async def complete(gateway: Gateway, lease: chunks_pb2.ChunkLease) -> None:
    writable_media_path(gateway.media_root, lease.segment_uri).write_bytes(b"segment;")
    now = time.time()
    stats = chunks_pb2.ChunkStats(
        frames=lease.frame_count,
        faces=lease.frame_count,
        frames_with_faces=lease.frame_count,
        started_at_unix=now - 0.2,
        finished_at_unix=now,
    )
    await gateway.queue.CompleteChunk(
        chunks_pb2.CompleteChunkRequest(lease_id=lease.lease_id, segment_uri=lease.segment_uri, stats=stats)
    )


async def run_every_chunk(gateway: Gateway) -> None:
    while (lease := await lease_and_beat(gateway)) is not None:
        await complete(gateway, lease)


def test_finished_job_serves_its_gpu_trend_chart_and_csv(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4")
        job = await gateway.jobs.SubmitJob(iter(submit_messages(spec)))
        watch = gateway.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id))
        queued = await watch.read()
        assert queued.state == jobs_pb2.JOB_STATE_QUEUED and queued.gpu_utilization_percent < 0
        first = await lease_and_beat(gateway)
        assert first is not None
        # The job stays RUNNING in the swap stage until this chunk completes, so that event must come.
        while (event := await watch.read()).stage != "swap":
            assert event.state != jobs_pb2.JOB_STATE_SUCCEEDED
        assert event.state == jobs_pb2.JOB_STATE_RUNNING
        assert (event.gpu_utilization_percent, event.gpu_memory_used_bytes) == (78.0, 5e9)
        await complete(gateway, first)
        await run_every_chunk(gateway)
        while (event := await watch.read()).state != jobs_pb2.JOB_STATE_SUCCEEDED:
            assert event.state in (jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_JOINING)
        assert event.gpu_utilization_percent < 0

        chart, chart_name, chart_size = await fetch_all(gateway, job.id, jobs_pb2.ARTIFACT_GPU_TREND_CHART)
        assert chart_name == "gpu_trend.png" and chart_size == len(chart)
        assert chart.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", chart[16:24]) == (1200, 900)
        table, table_name, _ = await fetch_all(gateway, job.id, jobs_pb2.ARTIFACT_GPU_TREND_CSV)
        lines = table.decode().splitlines()
        assert table_name == "gpu_trend.csv" and lines[0].startswith("timestamp,seconds,")
        report = json.loads((await gateway.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))).report_json)
        gpu = report["gpu"]
        assert gpu["samples"] == len(lines) - 1 > 0
        assert gpu["charts"] == {
            "png": f"outputs/{job.id}/gpu_trend.png",
            "csv": f"outputs/{job.id}/gpu_trend.csv",
        }
        assert gpu["gpus"][0]["utilization_peak_percent"] == 78.0
        assert not any("CPU mode" in warning for warning in report["warnings"])

    run(tmp_path, scenario, gpu_source=BusyGpuSource())


def test_without_gpu_samples_the_report_warns_of_cpu_mode(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        job = await gateway.jobs.SubmitJob(
            iter(submit_messages(jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4")))
        )
        await run_every_chunk(gateway)
        await gateway.parts.coordinator.wait_for_joins()
        report = json.loads((await gateway.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))).report_json)
        assert "no GPU samples in the job's window: ran in CPU mode" in report["warnings"]
        assert report["gpu"]["samples"] == 0
        chart, _, _ = await fetch_all(gateway, job.id, jobs_pb2.ARTIFACT_GPU_TREND_CHART)
        assert chart.startswith(b"\x89PNG")

    run(tmp_path, scenario)


def test_a_job_cancelled_before_it_started_has_no_gpu_trend(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        job = await gateway.jobs.SubmitJob(
            iter(submit_messages(jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4")))
        )
        await gateway.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await fetch_all(gateway, job.id, jobs_pb2.ARTIFACT_GPU_TREND_CHART)
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "before it started" in (failure.value.details() or "")
        report, name, _ = await fetch_all(gateway, job.id, jobs_pb2.ARTIFACT_REPORT)
        assert name == "report.json" and "gpu" not in json.loads(report)

    run(tmp_path, scenario)


def test_workers_chunk_queue_is_internal_and_the_job_service_public(tmp_path: Path) -> None:
    """Served on the public port, the queue let anyone lease a victim's chunk and complete it with their own video."""

    async def scenario(gateway: Gateway) -> None:
        audiences = {binding.full_name.rsplit(".", 1)[-1]: binding.audience for binding in gateway.parts.bindings()}
        assert audiences == {"JobService": "public", "ChunkQueueService": "internal"}

    run(tmp_path, scenario)


async def upload_job(jobs: jobs_pb2_grpc.JobServiceStub, source: bytes, name: str = "clip.mp4") -> jobs_pb2.Job:
    spec = jobs_pb2.JobSpec(source_image=source, target_filename=name)
    return await jobs.SubmitJob(iter(submit_messages(spec, [b"tenant video"])))


async def status_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return failure.value.code(), failure.value.details() or ""


async def stream_status(stream: AsyncIterator[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for _ in stream:
            pass
    return failure.value.code(), failure.value.details() or ""


def test_a_tenant_sees_fetches_and_cancels_only_its_own_jobs(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        acme, globex, internal = gateway.jobs_as("acme"), gateway.jobs_as("globex"), gateway.jobs_as("internal")
        job = await upload_job(acme, face_jpeg)
        assert job.target_uri == f"uploads/{job.id}/clip.mp4"
        assert (gateway.media_root / "tenants/acme" / job.target_uri).read_bytes() == b"tenant video"
        local_job = await upload_job(gateway.jobs, face_jpeg)
        assert (gateway.media_root / local_job.target_uri).is_file()

        # To globex the job does not exist: the same answer as for an id nobody has.
        missing = "0123456789abcdef"
        for job_id in (job.id, missing):
            expected = (grpc.StatusCode.NOT_FOUND, f"job '{job_id}' does not exist")
            assert await status_of(globex.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))) == expected
            assert await status_of(globex.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id))) == expected
            assert await stream_status(globex.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id))) == expected
            report = jobs_pb2.FetchArtifactRequest(job_id=job_id, artifact=jobs_pb2.ARTIFACT_REPORT)
            assert await stream_status(globex.FetchArtifact(report)) == expected
        assert list((await globex.ListJobs(jobs_pb2.ListJobsRequest())).jobs) == []
        assert [listed.id for listed in (await acme.ListJobs(jobs_pb2.ListJobsRequest())).jobs] == [job.id]
        local_list = await gateway.jobs.ListJobs(jobs_pb2.ListJobsRequest())
        assert [listed.id for listed in local_list.jobs] == [local_job.id]
        # A swapline service (the advisor) sees every tenant's jobs.
        everything = await internal.ListJobs(jobs_pb2.ListJobsRequest())
        assert [listed.id for listed in everything.jobs] == [local_job.id, job.id]

        await run_every_chunk(gateway)
        await gateway.parts.coordinator.wait_for_joins()
        output = jobs_pb2.FetchArtifactRequest(job_id=job.id, artifact=jobs_pb2.ARTIFACT_OUTPUT)
        assert (await stream_status(globex.FetchArtifact(output)))[0] == grpc.StatusCode.NOT_FOUND
        assert b"".join([piece.data async for piece in acme.FetchArtifact(output)]) == b"segment;" * 4
        assert (await acme.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))).state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert (await status_of(globex.CancelJob(jobs_pb2.CancelJobRequest(job_id=local_job.id))))[0] == (
            grpc.StatusCode.NOT_FOUND
        )

    run(tmp_path, scenario)


def test_no_tenant_can_name_another_tenants_upload_or_the_gateways_files(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        acme, globex = gateway.jobs_as("acme"), gateway.jobs_as("globex")
        victim = await upload_job(acme, face_jpeg)
        upload = f"uploads/{victim.id}/clip.mp4"
        (gateway.media_root / "sneaky.mp4").symlink_to(gateway.media_root / "tenants/acme" / upload)
        denied = grpc.StatusCode.PERMISSION_DENIED
        attempts = [
            (globex, f"../acme/{upload}", denied, "outside your media area"),
            (globex, str(gateway.media_root / "tenants/acme" / upload), denied, "outside your media area"),
            # Read in globex's own area, where no such file is.
            (globex, f"tenants/acme/{upload}", grpc.StatusCode.NOT_FOUND, "does not exist"),
            (gateway.jobs, f"tenants/acme/{upload}", denied, "the gateway's own files"),
            (gateway.jobs, f"work/{victim.id}/source-image", denied, "the gateway's own files"),
            (gateway.jobs, f"outputs/{victim.id}/report.json", denied, "the gateway's own files"),
            (gateway.jobs, "sneaky.mp4", denied, "the gateway's own files"),
            (gateway.jobs, "swapline.db", denied, "the gateway's own files"),
        ]
        for jobs, target_uri, code, words in attempts:
            spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri=target_uri)
            failure = await status_of(jobs.SubmitJob(iter(submit_messages(spec))))
            assert failure[0] == code and words in failure[1], (target_uri, failure)
            assert str(tmp_path) not in failure[1]
        # Its own upload, named relative to its area, is acme's to use again.
        again = await acme.SubmitJob(iter(submit_messages(jobs_pb2.JobSpec(source_image=face_jpeg, target_uri=upload))))
        assert again.state == jobs_pb2.JOB_STATE_QUEUED and again.target_uri == upload
        leases = [await lease_and_beat(gateway) for _ in range(8)]
        assert {lease.target_uri for lease in leases if lease} == {f"tenants/acme/{upload}"}

    run(tmp_path, scenario)


def test_source_images_live_in_media_storage_not_in_the_job_table(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        reference = jobs_pb2.FACE_SELECTOR_MODE_REFERENCE
        spec = jobs_pb2.JobSpec(
            source_image=face_jpeg, target_uri="clip.mp4", selector=reference, reference_image=face_jpeg
        )
        job = await gateway.jobs.SubmitJob(iter(submit_messages(spec)))
        record = gateway.parts.coordinator.require_job(job.id)
        assert (record.source_image_uri, record.reference_image_uri) == (
            f"work/{job.id}/source-image",
            f"work/{job.id}/reference-image",
        )
        assert (gateway.media_root / record.source_image_uri).read_bytes() == face_jpeg
        assert "source_image" not in {column.name for column in dataclasses.fields(record)}
        lease = await lease_and_beat(gateway)
        assert lease is not None and lease.source_image == face_jpeg and lease.reference_image == face_jpeg
        # A job with another selector stores no reference, whatever the spec carried.
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4", reference_image=face_jpeg)
        plain = gateway.parts.coordinator.require_job((await gateway.jobs.SubmitJob(iter(submit_messages(spec)))).id)
        assert plain.reference_image_uri == ""

    run(tmp_path, scenario)


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG claiming this size; nothing after the header."""
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height) + bytes(9)


def test_requests_past_the_limits_are_refused_before_anything_large_is_done(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        long_uri = "a/" * 250 + "clip.mp4"
        cases = [
            (jobs_pb2.JobSpec(source_image=png_header(1500, 1000), target_uri="clip.mp4"), "the limit is 1.0 Mpx"),
            (jobs_pb2.JobSpec(source_image=face_jpeg + bytes(200_000), target_uri="clip.mp4"), "bytes; the limit"),
            (jobs_pb2.JobSpec(source_image=face_jpeg, target_uri=long_uri), "the limit is 100"),
            (jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip\x00.mp4"), "control character"),
            (jobs_pb2.JobSpec(source_image=face_jpeg, target_filename="v" * 300 + ".mp4"), "the limit is 255"),
            (
                jobs_pb2.JobSpec(
                    source_image=face_jpeg, target_uri="clip.mp4", encode=encoder_pb2.EncodeSettings(crf=-1)
                ),
                "crf -1",
            ),
            (
                jobs_pb2.JobSpec(
                    source_image=face_jpeg, target_uri="clip.mp4", encode=encoder_pb2.EncodeSettings(preset="bogus")
                ),
                "preset 'bogus'",
            ),
        ]
        for spec, words in cases:
            job = await submit_expecting(gateway, submit_messages(spec), invalid, words)
            assert len(job.error.message) < 300 and str(tmp_path) not in job.error.message
            # A target_uri or encode setting that failed its checks is not stored with the failed job.
            assert job.target_uri in ("", "clip.mp4")
            assert gateway.parts.coordinator.require_job(job.id).encode == EncodeOptions()
        assert gateway.detector.sizes == []
        long_id = await status_of(gateway.jobs.GetJob(jobs_pb2.GetJobRequest(job_id="x" * 100_000)))
        assert long_id[0] == grpc.StatusCode.NOT_FOUND and len(long_id[1]) < 100

    run(tmp_path, scenario, max_image_pixels=1_000_000, max_image_bytes=200_000, max_uri_length=100)


@pytest.mark.parametrize(
    ("limit", "words"),
    [
        ({"max_frames": 99}, "has 100 frames; the limit is 99"),
        ({"max_duration_seconds": 3.5}, "the limit is 3.5 s"),
        ({"max_video_pixels": 64 * 48 - 1}, "(3071 pixels)"),
    ],
)
def test_a_target_past_the_limits_is_refused_before_chunks_are_planned(
    tmp_path: Path, face_jpeg: bytes, limit: dict[str, Any], words: str
) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4")
        job = await submit_expecting(gateway, submit_messages(spec), grpc.StatusCode.INVALID_ARGUMENT, words)
        assert job.chunks_total == 0

    run(tmp_path, scenario, **limit)


def test_images_are_decoded_off_the_event_loop(
    tmp_path: Path, face_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding_threads: list[int] = []

    def recording_decode(data: bytes, what: str, max_pixels: int) -> np.ndarray:
        decoding_threads.append(threading.get_ident())
        return decode_rgb_image(data, what, max_pixels)

    monkeypatch.setattr(job_intake, "decode_rgb_image", recording_decode)

    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        spec = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4")
        await gateway.jobs.SubmitJob(iter(submit_messages(spec)))
        assert len(decoding_threads) == 1 and decoding_threads[0] != threading.get_ident()

    run(tmp_path, scenario)


def test_a_job_names_its_models_and_its_leases_carry_them(tmp_path: Path, face_jpeg: bytes) -> None:
    async def scenario(gateway: Gateway) -> None:
        (gateway.media_root / "clip.mp4").write_bytes(b"video")
        chosen = jobs_pb2.JobSpec(
            source_image=face_jpeg, target_uri="clip.mp4", swapper="inswapper_128", detector="scrfd_2.5g"
        )
        job = await gateway.jobs.SubmitJob(iter(submit_messages(chosen)))
        assert (job.swapper, job.detector) == ("inswapper_128", "scrfd_2.5g")
        lease = await gateway.queue.LeaseChunk(chunks_pb2.LeaseChunkRequest(worker_id="w", wait_seconds=0))
        assert (lease.lease.swapper, lease.lease.detector) == ("inswapper_128", "scrfd_2.5g")
        plain = await gateway.jobs.SubmitJob(
            iter(submit_messages(jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4")))
        )
        assert (plain.swapper, plain.detector) == ("face_swapper", "mtcnn")
        unknown = jobs_pb2.JobSpec(source_image=face_jpeg, target_uri="clip.mp4", swapper="simswap_512")
        failed = await submit_expecting(
            gateway, submit_messages(unknown), grpc.StatusCode.INVALID_ARGUMENT, "inswapper_128"
        )
        assert failed.state == jobs_pb2.JOB_STATE_FAILED and "simswap_512" in failed.error.message

    run(tmp_path, scenario)

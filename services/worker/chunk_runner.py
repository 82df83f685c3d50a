"""One leased chunk: the job's faces prepared, the stage clients built, the pipeline run."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import NotFound
from services.common.face_model_catalog import ARCFACE, imported_models_of, job_models
from services.common.frames.frame_memory import FrameMemory
from services.common.frames.pixel_formats import PixelFormat
from services.common.job_vocabulary import selector_mode_from_proto
from services.common.residency_client import ResidencyClient
from services.worker.arcface_embedder import SAME_PERSON_DISTANCE, ArcFaceEmbedder
from services.worker.chunk_pipeline import HOST_WARPER, ChunkStats, FaceWarper, run_chunk_pipeline
from services.worker.face_selector import FaceSelection
from services.worker.settings import WarpDevice, WorkerSettings
from services.worker.source_face import JobFaceCache
from services.worker.stage_clients import DecoderFrameSource, DetectorFaceFinder, EncoderSegmentSink
from services.worker.swapper_registry import SwapperRegistry
from swapline.chunks.v1 import chunks_pb2
from swapline.decoder.v1 import decoder_pb2_grpc
from swapline.detector.v1 import detector_pb2_grpc
from swapline.encoder.v1 import encoder_pb2, encoder_pb2_grpc


@dataclass(frozen=True)
class StageStubs:
    decoder: decoder_pb2_grpc.DecoderServiceStub
    detector: detector_pb2_grpc.DetectorServiceStub
    encoder: encoder_pb2_grpc.EncoderServiceStub


def face_warper_for(device: WarpDevice) -> FaceWarper:
    """OpenCV on the host, or torch on the GPU; torch is imported only for the latter."""
    if device == "cpu":
        return HOST_WARPER
    from services.worker.batch_warp import TorchFaceWarper

    return TorchFaceWarper(device)


class ChunkRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        stubs: StageStubs,
        swappers: SwapperRegistry,
        arcface: ArcFaceEmbedder,
        residency: ResidencyClient | None,
        faces: JobFaceCache,
        warper: FaceWarper,
        frame_format: PixelFormat = "rgb24",
        frame_memory: FrameMemory | None = None,
    ) -> None:
        self._settings = settings
        # Frames from the decoder and to the encoder through files, where they share it (frame_memory.py).
        self._frame_memory = frame_memory
        # What the decoder is asked for (settings.resolve_frame_format); the encoder gets what the worker holds.
        self._frame_format = frame_format
        self._stubs = stubs
        self._swappers = swappers
        self._arcface = arcface
        self._residency = residency
        self._faces = faces
        self._warper = warper
        # One deadline for every stage call: the detector's answer waits on Triton, bounded by the same.
        self._stage_timeout = settings.triton_timeout_seconds

    def _finder(self, detector: str) -> DetectorFaceFinder:
        """The detector service asked for the job's detector model."""
        settings = self._settings
        return DetectorFaceFinder(
            self._stubs.detector,
            settings.detect_max_side,
            settings.min_face_size,
            self._stage_timeout,
            self._warper.shrink,
            model=detector,
        )

    async def _selection(self, lease: chunks_pb2.ChunkLease, finder: DetectorFaceFinder) -> FaceSelection:
        """The job's selector; a reference face is compared by ArcFace where Triton served it as the job began."""
        mode = selector_mode_from_proto(lease.selector)
        if mode != "reference":
            return FaceSelection(mode)

        async def arcface_if_installed() -> ArcFaceEmbedder | None:
            if self._residency is not None:
                try:
                    await self._residency.ensure_loaded([ARCFACE.name])
                except NotFound:
                    return None
            return self._arcface if await self._arcface.installed() else None

        reference = await self._faces.reference(lease.job_id, lease.reference_image, finder, arcface_if_installed)
        if reference.by_arcface:
            return FaceSelection(mode, reference.descriptor, SAME_PERSON_DISTANCE, self._arcface)
        return FaceSelection(mode, reference.descriptor)

    async def run(self, lease: chunks_pb2.ChunkLease, stats: ChunkStats) -> ChunkStats:
        imported = imported_models_of(job_models(lease.swapper, lease.detector))
        if imported and self._residency is not None:
            # Over the GPU memory budget the chunk fails as RESOURCE_EXHAUSTED: retried while other jobs'
            # models are in use, failed with the reason when this job's alone exceed it.
            await self._residency.ensure_loaded(imported)
        swapper = self._swappers.swapper(lease.swapper)
        finder = self._finder(lease.detector)
        identity = await self._faces.source_identity(lease.job_id, lease.source_image, finder, swapper)
        selection = await self._selection(lease, finder)
        source = DecoderFrameSource(
            self._stubs.decoder,
            uri=lease.target_uri,
            start_frame=lease.start_frame,
            seek_pts=lease.seek_pts,
            frame_count=lease.frame_count,
            batch_size=self._settings.batch_size,
            timeout_seconds=self._stage_timeout,
            pixel_format=self._frame_format,
            memory=self._frame_memory,
        )
        async with EncoderSegmentSink(
            self._stubs.encoder,
            segment_header(lease),
            self._stage_timeout,
            first_index=lease.start_frame,
            memory=self._frame_memory,
        ) as sink:
            done = await run_chunk_pipeline(
                source,
                finder,
                swapper,
                identity,
                sink,
                selection,
                stats,
                self._warper,
            )
        done.fp32_fallbacks += finder.fp32_fallbacks
        return done


def segment_header(lease: chunks_pb2.ChunkLease) -> encoder_pb2.SegmentHeader:
    return encoder_pb2.SegmentHeader(
        output_uri=lease.segment_uri,
        fps=lease.fps,
        width=lease.width,
        height=lease.height,
        settings=lease.encode,
        # The encoder refuses a segment of any other length, so a short decode fails the chunk there.
        expected_frames=lease.frame_count,
    )


def chunk_stats_to_proto(stats: ChunkStats) -> chunks_pb2.ChunkStats:
    return chunks_pb2.ChunkStats(
        frames=stats.frames,
        faces=stats.faces,
        frames_with_faces=stats.frames_with_faces,
        stage_seconds=stats.stage_seconds,
        face_count_changes=[
            chunks_pb2.FaceCountChange(frame_index=index, faces=faces) for index, faces in stats.face_count_changes
        ],
        warnings=stats.warnings,
        started_at_unix=stats.started_at,
        finished_at_unix=stats.finished_at,
        fp32_fallbacks=stats.fp32_fallbacks,
    )

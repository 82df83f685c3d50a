"""The GPU benchmark's baseline: the same jobs in one process, on the same GPU, with the same code.

The gateway's own chunk plan, the worker's chunk pipeline, the detector's and swapper's code over the
models' torch definitions on the GPU (what Triton serves there), and the encoder's segment writer and
joiner, with as many chunks in flight at once as the services have workers: so the chunks encode in
parallel here too, and only the gRPC hops, the process boundaries and Triton are left out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.bench.gpu_samplers import CoreCounter, summarise_window
from services.bench.local_stages import LocalFaceFinder, LocalFrameSource, LocalSegmentSink
from services.common.cuda_waiting import apply_cuda_wait
from services.common.job_vocabulary import STAGE_NAMES
from services.common.media_probe import probe_media
from services.common.model_runner import ModelRunner
from services.decoder.decode_backend import BackendChoice, select_backend
from services.encoder.segment_joiner import join_segments
from services.encoder.segment_writer import SegmentWriter, count_video_frames
from services.encoder.settings import EncoderSettings
from services.gateway.chunk_planner import plan_chunks
from services.triton.settings import cuda_wait_from_env
from services.worker.chunk_pipeline import ChunkStats, FaceWarper, run_chunk_pipeline
from services.worker.chunk_runner import face_warper_for
from services.worker.face_selector import FaceSelection
from services.worker.face_swapper import CropTransferSwapper
from services.worker.settings import resolve_warp_device
from services.worker.source_face import prepare_source_identity

if TYPE_CHECKING:
    from services.bench.gpu_bench import Clip
    from services.bench.gpu_samplers import NvmlSampler

DETECT_MAX_SIDE = 640


def gpu_models(repository: Path = Path("triton_models")) -> tuple[ModelRunner, bool]:
    """The built-in models' torch definitions as Triton serves them: on the GPU in FP16 with the whole
    cascade, or on a CPU in FP32 with the per-stage nets; and whether the cascade is among them."""
    import torch

    from services.model_build.torch_models import TorchModelRunner

    # Waiting for the GPU as the services' processes do (SWAPLINE_TRITON_CUDA_WAIT), before torch makes the context.
    apply_cuda_wait(cuda_wait_from_env())
    if torch.cuda.is_available():
        return TorchModelRunner.built_in(repository, torch.device("cuda"), "fp16"), True
    per_stage = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "face_swapper")
    return TorchModelRunner.built_in(repository, torch.device("cpu"), "fp32", per_stage), False


async def run_job(
    video: Path,
    clip: Clip,
    source_png: bytes,
    concurrency: int,
    models: ModelRunner,
    cascade: bool,
    decoding: BackendChoice,
    warper: FaceWarper,
    work_dir: Path,
) -> dict[str, Any]:
    from services.detector.face_detector import CascadeFaceDetector, FaceDetector

    info = probe_media(video)
    chunks = plan_chunks("in-process", info, 1.0)
    detector = CascadeFaceDetector(models) if cascade else FaceDetector(models)
    finder = LocalFaceFinder(detector, DETECT_MAX_SIDE, warper.shrink)
    swapper = CropTransferSwapper(models, crops=warper.crop_codec)
    selection = FaceSelection(mode=clip.selector)  # type: ignore[arg-type]
    started = time.monotonic()
    identity = await prepare_source_identity(source_png, finder, swapper)
    slots = asyncio.Semaphore(concurrency)
    segments = [work_dir / f"{clip.name}-{chunk.index:04d}.mp4" for chunk in chunks]

    async def one_chunk(index: int) -> ChunkStats:
        chunk = chunks[index]
        async with slots:
            writer = SegmentWriter(
                segments[index],
                info.fps,
                info.width,
                info.height,
                crf=EncoderSettings.default_crf,
                preset=EncoderSettings.default_preset,
            )
            with writer:
                source = LocalFrameSource(
                    video, chunk.frame_count, 8, chunk.start_frame, chunk.seek_pts, decoding, warper.pixel_format
                )
                return await run_chunk_pipeline(
                    source, finder, swapper, identity, LocalSegmentSink(writer), selection, warper=warper
                )

    stats = await asyncio.gather(*(one_chunk(index) for index in range(len(chunks))))
    output = work_dir / f"{clip.name}-output.mp4"
    await asyncio.to_thread(join_segments, segments, output, video)
    wall = time.monotonic() - started
    frames = sum(chunk.frames for chunk in stats)
    return {
        "clip": clip.name,
        "frames": frames,
        "wall_seconds": wall,
        "fps": frames / wall,
        "output_frames": count_video_frames(output),
        "ms_per_frame": {
            stage: 1000 * sum(chunk.stage_seconds[stage] for chunk in stats) / max(frames, 1) for stage in STAGE_NAMES
        },
        "started": started,
    }


def run_in_process(
    media: dict[str, Path],
    clips: Sequence[Clip],
    source_png: bytes,
    concurrency: int,
    sampler: NvmlSampler | None,
    work_dir: Path = Path("build/gpu-bench/in-process"),
) -> dict[str, Any]:
    """Each clip once to warm up, then once measured; per clip the figures gpu_bench reports for the services."""
    work_dir.mkdir(parents=True, exist_ok=True)
    models, cascade = gpu_models()
    decoding = select_backend("auto", gpu_id=0)
    warper = face_warper_for(resolve_warp_device("auto"))
    results = []
    for clip in clips:
        asyncio.run(
            run_job(media[clip.name], clip, source_png, concurrency, models, cascade, decoding, warper, work_dir)
        )
        cores = CoreCounter()
        cores.begin()
        result = asyncio.run(
            run_job(media[clip.name], clip, source_png, concurrency, models, cascade, decoding, warper, work_dir)
        )
        result["cpu_cores_busy"] = cores.end()
        started = result.pop("started")
        window = summarise_window(sampler.samples, started, started + result["wall_seconds"]) if sampler else None
        result["gpu"] = dataclasses.asdict(window) if window is not None else None
        result["frames_ok"] = result["output_frames"] == result["frames"] == probe_media(media[clip.name]).frame_count
        print(f"in-process, {concurrency} chunks at once, {clip.name}: {result['fps']:.1f} fps", flush=True)
        results.append(result)
    return {"concurrency": concurrency, "decoder": decoding.active, "jobs": results}

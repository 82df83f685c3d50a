"""`make bench`: end-to-end fps through the services, and the same frames in one process.

Both runs use the same video (the demo's: 5 s, 720p, 25 fps, one face), the same ONNX models and
the same chunk pipeline code, and do the same work: the source face's identity, every frame, and
the output joined with the original audio. The difference is the gRPC hops, the process boundaries
and the chunking, printed as a ratio. For the services, "wall seconds" runs from submit to the
final progress event (upload, validation, report and chart included); "pipeline seconds" is the
job's own window from its first chunk lease to the end of the join, the same work the in-process
run times, and the ratio uses it. Each services job is paired with an in-process run just before
it and the ratio is the median of the pairs' ratios, so the VM's drift in speed cancels; each
column shows its median run (after a warm-up run) with the spread of all runs beside it. One frame
hop is also timed alone (frame_hop.py), and one face-swapper request through Triton with its tensors
in the gRPC payload and in shared memory (triton_hop.py). Last, a batch of short clips times two faces runs
on a stack of its own (batch_bench.py): jobs a minute and fps. Results also go to <workdir>/bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.bench.batch_bench import batch_line, describe_batch, wait_for_job
from services.bench.frame_hop import measure_hops
from services.bench.local_stages import LocalFaceFinder, LocalFrameSource, LocalSegmentSink
from services.bench.triton_hop import FACES, measure_triton_hops
from services.cli import sample_media
from services.cli.embedded_stack import (
    DEFAULT_MODEL_REPOSITORY,
    FRAME_TRANSPORTS,
    EmbeddedStack,
    FrameTransport,
    StackOptions,
)
from services.cli.job_client import JobClient
from services.common.frames.frame_allocator import keep_frame_buffers
from services.common.job_vocabulary import STAGE_NAMES
from services.common.media_paths import write_file
from services.common.media_probe import probe_media
from services.decoder.frame_reader import iter_frame_batches
from services.detector.face_detector import FaceDetector
from services.encoder.segment_joiner import join_segments
from services.encoder.segment_writer import SegmentWriter
from services.encoder.settings import EncoderSettings
from services.triton.local_models import LocalModels
from services.worker.chunk_pipeline import run_chunk_pipeline
from services.worker.face_selector import FaceSelection
from services.worker.face_swapper import CropTransferSwapper
from services.worker.source_face import prepare_source_identity
from swapline.jobs.v1 import jobs_pb2

DETECT_MAX_SIDE = 640
BATCH_SIZE = 8


class InProcessJob:
    """The services' job window in one process: the source face, every frame, and the output with audio."""

    def __init__(self, video: Path, source_png: bytes, output: Path) -> None:
        self._video, self._source_png, self._output = video, source_png, output
        self._info = probe_media(video)
        models = LocalModels(DEFAULT_MODEL_REPOSITORY, intra_op_threads=StackOptions.triton_intra_op_threads)
        self._finder = LocalFaceFinder(FaceDetector(models), DETECT_MAX_SIDE)
        self._swapper = CropTransferSwapper(models)

    async def _run(self) -> dict[str, Any]:
        info, segment = self._info, self._output.with_suffix(".segment.mp4")
        started = time.perf_counter()
        identity = await prepare_source_identity(self._source_png, self._finder, self._swapper)
        with SegmentWriter(
            segment,
            info.fps,
            info.width,
            info.height,
            crf=EncoderSettings.default_crf,
            preset=EncoderSettings.default_preset,
        ) as writer:
            stats = await run_chunk_pipeline(
                LocalFrameSource(self._video, info.frame_count, BATCH_SIZE),
                self._finder,
                self._swapper,
                identity,
                LocalSegmentSink(writer),
                FaceSelection(mode="one"),
            )
        await asyncio.to_thread(join_segments, [segment], self._output, self._video)
        wall = time.perf_counter() - started
        return {
            "frames": stats.frames,
            "wall_seconds": wall,
            "pipeline_seconds": wall,
            "fps": stats.frames / wall,
            "pipeline_fps": stats.frames / wall,
            "ms_per_frame": {stage: 1000 * stats.stage_seconds[stage] / stats.frames for stage in STAGE_NAMES},
        }

    def run(self, name: str) -> dict[str, Any]:
        result = asyncio.run(self._run())
        print(f"  in-process, {name}: {result['pipeline_seconds']:.2f} s", flush=True)
        return result


def paired_runs(
    video: Path,
    source_png: bytes,
    work_dir: Path,
    workers: int,
    transport: FrameTransport,
    repeat: int,
    in_process: InProcessJob,
    frame_memory: bool = True,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(in-process run, services job) pairs, each in-process run right before its job.

    The VM's speed drifts by 10-20% over minutes; a ratio within a pair cancels most of that drift.
    """
    options = StackOptions(
        work_dir=work_dir,
        media_root=work_dir / "media",
        workers=workers,
        worker_batch_size=BATCH_SIZE,
        frame_transport=transport,
        frame_memory=frame_memory,
    )
    name = column_name(workers, transport, frame_memory)
    pairs = []
    with EmbeddedStack(options) as stack, JobClient(stack.gateway_address) as client:
        warmup = client.submit(source_png, target_path=video)
        wait_for_job(client, warmup.id)
        for run in range(1, repeat + 1):
            baseline = in_process.run(f"before {name} run {run}")
            started = time.perf_counter()
            job = client.submit(source_png, target_path=video)
            finished = wait_for_job(client, job.id)
            wall = time.perf_counter() - started
            if finished.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                raise SystemExit(f"benchmark job failed: {finished.error.message}")
            report = json.loads(finished.report_json)
            frames = report["frames"]
            print(f"  {name}, run {run}: {report['wall_seconds']:.2f} s", flush=True)
            pairs.append(
                (
                    baseline,
                    {
                        "frames": frames,
                        "workers": workers,
                        "wall_seconds": wall,
                        "pipeline_seconds": report["wall_seconds"],
                        "fps": frames / wall,
                        "pipeline_fps": frames / report["wall_seconds"],
                        "chunks": report["chunks"],
                        "ms_per_frame": {stage: report["stages"][stage]["ms_per_frame"] for stage in STAGE_NAMES},
                        "join_seconds": report["stages"]["join"]["seconds"],
                    },
                )
            )
    return pairs


def column_name(workers: int, transport: FrameTransport, frame_memory: bool) -> str:
    return f"services, {workers} worker(s), {transport}" + ("" if frame_memory else ", frames in messages")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median pipeline time (the upper one of an even count), with every run's time beside it."""
    ordered = sorted(runs, key=lambda run: run["pipeline_seconds"])
    return {**ordered[len(ordered) // 2], "runs_pipeline_seconds": [run["pipeline_seconds"] for run in runs]}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    columns = list(results)
    print(f"{'':24}" + "".join(f"{name.removeprefix('services, '):>22}" for name in columns))
    print(f"{'end-to-end fps':24}" + "".join(f"{results[n]['fps']:>22.2f}" for n in columns))
    print(f"{'pipeline fps':24}" + "".join(f"{results[n]['pipeline_fps']:>22.2f}" for n in columns))
    print(f"{'pipeline seconds':24}" + "".join(f"{results[n]['pipeline_seconds']:>22.2f}" for n in columns))
    print(f"{'wall seconds':24}" + "".join(f"{results[n]['wall_seconds']:>22.2f}" for n in columns))
    spreads = [results[n]["runs_pipeline_seconds"] for n in columns]
    print(f"{'pipeline s, all runs':24}" + "".join(f"{f'{min(runs):.2f}-{max(runs):.2f}':>22}" for runs in spreads))
    for stage in STAGE_NAMES:
        print(f"{stage + ' ms/frame':24}" + "".join(f"{results[n]['ms_per_frame'][stage]:>22.2f}" for n in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench", description=__doc__)
    parser.add_argument("--workdir", default="build/bench")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=FRAME_TRANSPORTS,
        default=list(FRAME_TRANSPORTS),
        help="how workers reach the frame services; the embedded stack's default is unix",
    )
    parser.add_argument(
        "--frame-memory",
        nargs="+",
        choices=("on", "off"),
        default=["on"],
        help="frames between the services through /dev/shm (on, the embedded stack's default) or in the messages",
    )
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per column; the median is shown")
    parser.add_argument(
        "--batch-workers", type=int, default=2, help="workers of the stack the batch line runs on (0: no batch line)"
    )
    args = parser.parse_args(argv)
    # The in-process run gets the allocator settings the frame services apply at start.
    keep_frame_buffers()
    work_dir = Path(args.workdir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    video = work_dir / "astronaut-720p.mp4"
    if not video.exists():
        sample_media.make_face_video(video, sample_media.astronaut_photo())
    source_png = sample_media.encode_png(sample_media.grace_hopper_photo())
    info = probe_media(video)
    print(f"video: {video.name}, {info.width}x{info.height}, {info.fps:g} fps, {info.frame_count} frames", flush=True)

    in_process = InProcessJob(video, source_png, work_dir / "in-process.mp4")
    # The first run warms the models up, as the services' warm-up job does.
    in_process.run("warm-up run")
    batches = iter_frame_batches(video, 0, 0, info.frame_count, BATCH_SIZE)
    video_frames = np.concatenate([frames for frames, _, _ in batches])
    hops = measure_hops(video_frames, BATCH_SIZE, args.repeat)
    del video_frames
    triton_hops = measure_triton_hops(
        DEFAULT_MODEL_REPOSITORY, work_dir / "triton-hop", StackOptions.triton_intra_op_threads
    )
    baselines: list[dict[str, Any]] = []
    columns: dict[str, dict[str, Any]] = {}
    for transport, workers, memory in itertools.product(args.transports, args.workers, args.frame_memory):
        pairs = paired_runs(
            video,
            source_png,
            work_dir / f"stack-{workers}",
            workers,
            transport,
            args.repeat,
            in_process,
            memory == "on",
        )
        baselines += [baseline for baseline, _ in pairs]
        columns[column_name(workers, transport, memory == "on")] = {
            **median_run([job for _, job in pairs]),
            "pipeline_ratios": [job["pipeline_seconds"] / baseline["pipeline_seconds"] for baseline, job in pairs],
            "wall_ratios": [job["wall_seconds"] / baseline["pipeline_seconds"] for baseline, job in pairs],
        }
    results = {"in-process": median_run(baselines), **columns}
    print_table(results)
    for name, column in columns.items():
        ratios = column["pipeline_ratios"]
        print(
            f"service hops, {name}: {statistics.median(ratios):.2f}x the in-process time"
            f" (median of {len(ratios)} paired runs, {min(ratios):.2f}x-{max(ratios):.2f}x;"
            f" {statistics.median(column['wall_ratios']):.2f}x counting upload, validation and the report)"
        )
    print(f"one frame hop alone ({info.frame_count} frames streamed over gRPC, both ends in one process):")
    for hop, figures in hops.items():
        print(f"  {hop:>16}: {figures.cpu_ms_per_frame:.2f} ms CPU, {figures.wall_ms_per_frame:.2f} ms wall a frame")
    print(f"one face-swapper request ({FACES} faces) through Triton alone, a request:")
    for transport, triton_figures in triton_hops.items():
        print(
            f"  {transport:>16}: client {triton_figures.client_cpu_ms:.1f} ms CPU, tritonserver and stubs"
            f" {triton_figures.server_cpu_ms:.1f} ms CPU, {triton_figures.wall_ms:.1f} ms wall"
        )
    batch = batch_line(work_dir, args.batch_workers) if args.batch_workers > 0 else None
    if batch is not None:
        print(describe_batch(batch, args.batch_workers))
    record = {
        **results,
        "batch": None if batch is None else dataclasses.asdict(batch),
        "frame_hop": {hop: dataclasses.asdict(figures) for hop, figures in hops.items()},
        "triton_hop": {transport: dataclasses.asdict(figures) for transport, figures in triton_hops.items()},
    }
    write_file(work_dir / "bench.json", json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

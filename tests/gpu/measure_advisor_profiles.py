"""Measures job profiles for the advisor's time model: the same jobs, run on whatever GPU this machine has.

Not a pytest module. From the repository root, on each GPU machine:

    python -m tests.gpu.measure_advisor_profiles --media build/advisor-media

It runs the in-process chunk pipeline (services/bench/local_stages.py + run_chunk_pipeline) with
the detector's and worker's own code, the models behind services/model_build/torch_models'
TorchModelRunner: the built-in models' torch definitions with the model.pt state dicts `make models`
writes into triton_models/ (carry them), on CUDA in FP16 (on a CPU in FP32, so the same code can be
tried without a GPU). It samples NVML every 0.1 s during each run, and prints and writes
`$OUT/measurements-<gpu>.json` (or --out): a JSON list of {"job", "gpu_model", "device",
"measured_seconds", "torch_peak_allocated_bytes", "report"} whose reports carry the gateway's keys
and `gpu` section, so profile_from_report reads them. Feed the files of two GPU kinds to
`python -m services.advisor.calibration_fitter`.

Media: the jobs' videos and the source face are made with services/cli/sample_media (needs PyAV,
scikit-image and matplotlib). Make them once where those are installed with `--prepare-only`, and
carry the folder to machines that lack them. Every job runs once to warm up (CUDA context, kernel
selection), then once measured.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from services.model_build.torch_models import TorchModelRunner

REQUIRED_MODULES = ("torch", "av", "cv2", "numpy", "grpc", "google.protobuf", "tritonclient")
DEFAULT_REPOSITORY = Path("triton_models")
DETECT_MAX_SIDE = 640
BATCH_SIZE = 8
SAMPLE_INTERVAL_SECONDS = 0.1
SOURCE_FACE = "source-grace-hopper.png"


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    size: tuple[int, int]
    two_people: bool
    selector: str

    @property
    def video_name(self) -> str:
        return f"{self.job_id}.mp4"


JOBS = (
    JobSpec("one-face-480p", (854, 480), False, "one"),
    JobSpec("two-faces-720p", (1280, 720), True, "many"),
    JobSpec("one-face-1080p", (1920, 1080), False, "one"),
)


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def prepare_media(media: Path, jobs: Sequence[JobSpec], seconds: float) -> None:
    from services.cli import sample_media

    media.mkdir(parents=True, exist_ok=True)
    source = media / SOURCE_FACE
    if not source.exists():
        source.write_bytes(sample_media.encode_png(sample_media.grace_hopper_photo()))
    for job in jobs:
        video = media / job.video_name
        if video.exists():
            continue
        photo = sample_media.make_two_person_image(size=job.size) if job.two_people else sample_media.astronaut_photo()
        sample_media.make_face_video(video, photo, seconds=seconds, size=job.size, audio=False)
        print(f"made {video}", file=sys.stderr, flush=True)


class GpuSampler:
    """Samples every GPU through NVML on a thread; falls back to pynvml when the shared reader is absent."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._read = self._reader()

    @staticmethod
    def _shared_reader() -> Any:
        try:
            from services.common.gpu_telemetry import GpuUnavailable, NvmlReader
        except ImportError:
            return None
        reader = NvmlReader()
        try:
            reader.sample_all()
        except GpuUnavailable:
            return None

        def read() -> list[dict[str, Any]]:
            return [
                {
                    "index": s.index,
                    "uuid": s.uuid,
                    "model": s.model,
                    "utilization": s.utilization_percent,
                    "memory_used": s.memory_used_bytes,
                    "memory_total": s.memory_total_bytes,
                    "temperature": s.temperature_celsius,
                    "power": s.power_watts,
                }
                for s in reader.sample_all()
            ]

        return read

    @classmethod
    def _reader(cls) -> Any:
        shared = cls._shared_reader()
        if shared is not None:
            return shared
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver, no GPU or no pynvml: the run goes on without telemetry
            return None

        def read_raw() -> list[dict[str, Any]]:
            rows = []
            for index, handle in enumerate(handles):
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                rows.append(
                    {
                        "index": index,
                        "uuid": pynvml.nvmlDeviceGetUUID(handle),
                        "model": pynvml.nvmlDeviceGetName(handle),
                        "utilization": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        "memory_used": int(memory.used),
                        "memory_total": int(memory.total),
                        "temperature": float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
                        "power": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                    }
                )
            return rows

        return read_raw

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._read is not None:
                self.samples.extend(self._read())
            self._stop.wait(SAMPLE_INTERVAL_SECONDS)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def section(self) -> dict[str, Any]:
        """The report's `gpu` section, with the keys services/gateway/job_report.py gpu_statistics writes."""
        gpus = []
        for index in sorted({sample["index"] for sample in self.samples}):
            mine = [sample for sample in self.samples if sample["index"] == index]
            utilization = [sample["utilization"] for sample in mine]
            memory = [sample["memory_used"] for sample in mine]
            gpus.append(
                {
                    "node": os.uname().nodename,
                    "index": index,
                    "uuid": mine[-1]["uuid"],
                    "model": mine[-1]["model"],
                    "samples": len(mine),
                    "utilization_mean_percent": round(float(np.mean(utilization)), 4),
                    "utilization_peak_percent": round(float(np.max(utilization)), 4),
                    "utilization_p95_percent": round(float(np.percentile(utilization, 95)), 4),
                    "memory_used_peak_bytes": int(np.max(memory)),
                    "memory_used_p95_bytes": int(np.percentile(memory, 95)),
                    "memory_total_bytes": int(mine[-1]["memory_total"]),
                    "temperature_peak_celsius": float(np.max([s["temperature"] for s in mine])),
                    "power_mean_watts": round(float(np.mean([s["power"] for s in mine])), 3),
                }
            )
        return {"source": "nvml", "samples": len(self.samples), "gpus": gpus}


async def run_job(
    job: JobSpec, media: Path, models: TorchModelRunner, device: torch.device, work: Path
) -> dict[str, Any]:
    import torch

    from services.bench.local_stages import LocalFaceFinder, LocalFrameSource, LocalSegmentSink
    from services.common.job_vocabulary import STAGE_NAMES
    from services.common.media_probe import probe_media
    from services.detector.face_detector import FaceDetector
    from services.encoder.segment_writer import SegmentWriter
    from services.worker.chunk_pipeline import run_chunk_pipeline
    from services.worker.face_selector import FaceSelection
    from services.worker.face_swapper import CropTransferSwapper
    from services.worker.source_face import prepare_source_identity

    video = media / job.video_name
    info = probe_media(video)
    finder = LocalFaceFinder(FaceDetector(models), DETECT_MAX_SIDE)
    swapper = CropTransferSwapper(models)
    identity = await prepare_source_identity((media / SOURCE_FACE).read_bytes(), finder, swapper)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as sampler:
        started = time.perf_counter()
        with SegmentWriter(work / job.video_name, info.fps, info.width, info.height, crf=20, preset="veryfast") as w:
            stats = await run_chunk_pipeline(
                LocalFrameSource(video, info.frame_count, BATCH_SIZE),
                finder,
                swapper,
                identity,
                LocalSegmentSink(w),
                FaceSelection(mode=job.selector),  # type: ignore[arg-type]
            )
        wall = time.perf_counter() - started
    frames = stats.frames
    stages: dict[str, Any] = {
        stage: {
            "seconds": round(stats.stage_seconds[stage], 4),
            "ms_per_frame": round(1000.0 * stats.stage_seconds[stage] / frames, 4),
            "fps": round(frames / stats.stage_seconds[stage], 4) if stats.stage_seconds[stage] else 0.0,
        }
        for stage in STAGE_NAMES
    }
    gpu_section = sampler.section()
    report: dict[str, Any] = {
        "job_id": job.job_id,
        "state": "succeeded",
        "selector": job.selector,
        "target": {
            "uri": job.video_name,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "frames": info.frame_count,
            "duration_seconds": info.duration_seconds,
            "has_audio": False,
        },
        "frames": frames,
        "faces": stats.faces,
        "frames_with_faces": stats.frames_with_faces,
        "chunks": 1,
        "chunk_attempts": 1,
        "wall_seconds": round(wall, 4),
        "fps": round(frames / wall, 4),
        "stages": {**stages, "join": {"seconds": 0.0}},
        "events": [
            {"t": 0.0, "kind": "chunk_start", "chunk": 0, "frame": 0, "faces": None},
            {"t": round(wall, 4), "kind": "chunk_end", "chunk": 0, "frame": frames, "faces": stats.faces},
        ],
        "warnings": list(stats.warnings),
        "gpu": gpu_section,
    }
    gpus = gpu_section["gpus"]
    return {
        "job": job.job_id,
        "gpu_model": gpus[0]["model"] if gpus and device.type == "cuda" else "",
        "device": str(device),
        "measured_seconds": round(wall, 4),
        "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else 0,
        "report": report,
    }


async def measure(jobs: Sequence[JobSpec], media: Path, repository: Path, work: Path) -> list[dict[str, Any]]:
    import torch

    from services.model_build.torch_models import TorchModelRunner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = TorchModelRunner.built_in(repository, device, "fp16" if device.type == "cuda" else "fp32")
    measurements = []
    for job in jobs:
        await run_job(job, media, models, device, work)
        measured = await run_job(job, media, models, device, work)
        print(
            f"{job.job_id}: {measured['measured_seconds']:.2f} s on {measured['gpu_model'] or 'CPU'}",
            file=sys.stderr,
            flush=True,
        )
        measurements.append(measured)
    return measurements


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", type=Path, default=Path("build/advisor-media"))
    parser.add_argument(
        "--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository with model.pt files"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "build/advisor-measurements")))
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each generated video")
    parser.add_argument("--jobs", nargs="+", choices=[job.job_id for job in JOBS], default=[job.job_id for job in JOBS])
    parser.add_argument("--prepare-only", action="store_true", help="make the media and stop")
    args = parser.parse_args(argv)
    jobs = [job for job in JOBS if job.job_id in args.jobs]
    run_only = ("torch", "cv2", "grpc", "tritonclient")
    missing = [name for name in missing_modules() if not (args.prepare_only and name in run_only)]
    if missing:
        print(
            f"missing Python modules: {', '.join(missing)} (carry their wheels and pip install them)",
            file=sys.stderr,
        )
        return 2
    if not all((args.media / job.video_name).exists() for job in jobs) or not (args.media / SOURCE_FACE).exists():
        prepare_media(args.media, jobs, args.seconds)
    if args.prepare_only:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    # Output segments are thrown away: only the timings matter, and $OUT brings back few files.
    with tempfile.TemporaryDirectory() as work:
        measurements = asyncio.run(measure(jobs, args.media, args.repository, Path(work)))
    gpu = measurements[0]["gpu_model"] if measurements else ""
    path = args.out / f"measurements-{_slug(gpu) if gpu else 'cpu'}.json"
    path.write_text(json.dumps(measurements, indent=2))
    print(json.dumps(measurements, indent=2))
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

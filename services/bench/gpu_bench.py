"""The GPU benchmark through the services: 1080p clips swapped by the embedded stack on a GPU machine.

Runs where the GPU is (the device tool's `nvidia-h200`, started by services/bench/gpu_device.sh; it
also runs on a CPU machine, slowly, with the same code). For each number of workers it starts the
embedded stack (tritonserver with the models on the GPU, every service its own process, as in
`swapline up`), times its start apart, warms it up with one job, then swaps each clip:

- end-to-end fps: frames over the wall time from SubmitJob (upload included) to the joined output
  (the job's finished_at: the report is rendered after it, and the final event follows that); the
  report's pipeline window (first chunk lease to the joined output) and the time to the final event
  beside it;
- GPU utilisation (mean and max), NVDEC and NVENC utilisation and GPU memory from NVML sampled every
  0.1 s inside the job's window; CPU cores busy over the same window from /proc/stat;
- the report's per-stage ms per frame (stages overlap, so they add up to more than the wall time),
  and each process's CPU ms per frame (every service, tritonserver and its model stubs) from /proc;
- Triton's own statistics per model over the job: executions, mean batch, and the time requests
  queue and executions compute (triton_deltas);
- the output checked: its frame count against the clip's, and a few frames kept for the identity
  judge, which runs where dlib is (`--judge`, on the CPU machine).

Then the same jobs in one process on the same GPU (in_process_gpu.py: the same chunk plan, GPU code
and parallel encode), so the cost of the services is a ratio. Everything goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.bench.gpu_samplers import (
    CoreCounter,
    GpuWindow,
    NvmlSampler,
    cpu_ms_per_frame,
    descendant_cpu_seconds,
    summarise_gpus,
    summarise_window,
)
from services.cli import sample_media
from services.cli.embedded_stack import TRITON_NAME, EmbeddedStack, StackOptions
from services.cli.gpu_layout import CUDA_VISIBLE_DEVICES, available_cores, plan_gpu_layout
from services.cli.job_client import JobClient
from services.common.job_vocabulary import STAGE_NAMES
from services.common.media_paths import temporary_path, write_file
from services.common.media_probe import probe_media
from services.encoder.segment_writer import count_video_frames
from services.triton.device_choice import probe_cuda
from services.triton.settings import cuda_wait_from_env, gpu_instances_from_env
from swapline.jobs.v1 import jobs_pb2

CLIP_SIZE = (1920, 1080)
CLIP_FPS = 25
KEYFRAME_SECONDS = 1.0
# One chunk a keyframe interval: a 20 s clip makes 20 chunks, enough to keep 8 workers and the
# encoder's parallel segments busy to the end.
CHUNK_SECONDS = 1.0
WORKER_BATCH_SIZE = 8
SOURCE_FACE = "source-grace-hopper.png"
SAMPLE_FRAMES = 3
SAMPLE_WIDTH = 960
FINAL_STATES = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
# The phases Triton times (its InferStatistics). Requests wait in the queue; the compute phases are also
# timed once per execution (batch_stats), where a batch's time is not counted again for each request in it.
TRITON_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
EXECUTION_PHASES = TRITON_PHASES[1:]
# A worker's counters (services/worker/worker_metrics.py): what each GPU's workers did in a job's window.
WORKER_FRAMES_METRIC = "swapline_worker_frames"
WORKER_CHUNKS_METRIC = "swapline_worker_chunks"
# With --visible-gpus, CUDA numbers the GPUs as NVML does, so the per-GPU lines name the same GPUs.
CUDA_DEVICE_ORDER = ("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


@dataclass(frozen=True)
class Clip:
    name: str
    selector: str
    faces: int

    @property
    def file_name(self) -> str:
        return f"{self.name}-1080p.mp4"


CLIPS = (Clip("one-face", "one", 1), Clip("six-people", "many", 6))
CLIP_NAMES = tuple(clip.name for clip in CLIPS)


def prepare_media(media: Path, seconds: float, clips: Sequence[Clip]) -> dict[str, Path]:
    """The clips (1080p, 25 fps, keyframes every second, with audio) and the source face; made once."""
    media.mkdir(parents=True, exist_ok=True)
    source = media / SOURCE_FACE
    if not source.exists():
        write_file(source, sample_media.encode_png(sample_media.grace_hopper_photo()))
    paths = {}
    for clip in clips:
        path = media / f"{seconds:g}s-{clip.file_name}"
        if not path.exists():
            photo = sample_media.make_group_image(CLIP_SIZE) if clip.faces > 1 else sample_media.astronaut_photo()
            partial = temporary_path(path)
            sample_media.make_face_video(
                partial, photo, seconds=seconds, size=CLIP_SIZE, fps=CLIP_FPS, keyframe_seconds=KEYFRAME_SECONDS
            )
            os.replace(partial, path)
        paths[clip.name] = path
    return paths


def machine_description() -> dict[str, Any]:
    description: dict[str, Any] = {"cpu_cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        description["torch"] = torch.__version__
        description["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            description["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        description["torch"] = None
    return description


def stage_ms(report: dict[str, Any]) -> dict[str, float]:
    return {stage: float(report["stages"][stage]["ms_per_frame"]) for stage in STAGE_NAMES}


def sample_output_frames(path: Path, count: int = SAMPLE_FRAMES, width: int = SAMPLE_WIDTH) -> np.ndarray:
    """`count` frames spread over the output, shrunk to `width`: what the identity judge looks at."""
    import av
    import cv2

    total = count_video_frames(path)
    wanted = {round(index * (total - 1) / max(count - 1, 1)) for index in range(count)}
    frames = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                picture = frame.to_ndarray(format="rgb24")
                height = round(picture.shape[0] * width / picture.shape[1])
                frames.append(cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def triton_statistics(url: str) -> dict[str, Any]:
    """Every model's statistics since tritonserver started, as Triton's JSON (ModelStatisticsResponse)."""
    client = triton_grpc.InferenceServerClient(url)
    try:
        statistics: dict[str, Any] = client.get_inference_statistics(as_json=True)
        return statistics
    finally:
        client.close()


def _number(value: Any) -> int:
    """A uint64 of Triton's JSON: protobuf writes them as strings and leaves the zeros out."""
    return int(value or 0)


def _model_totals(statistics: Mapping[str, Any]) -> dict[str, Counter[str]]:
    """Per model (its versions added up): the counts, and each phase's count and ns for requests and executions."""
    totals: dict[str, Counter[str]] = {}
    for model in statistics.get("model_stats", []):
        total = totals.setdefault(model["name"], Counter())
        total["inference_count"] += _number(model.get("inference_count"))
        total["execution_count"] += _number(model.get("execution_count"))
        requests = model.get("inference_stats", {})
        total["requests"] += _number(requests.get("success", {}).get("count"))
        for phase in TRITON_PHASES:
            total[f"request_{phase}_count"] += _number(requests.get(phase, {}).get("count"))
            total[f"request_{phase}_ns"] += _number(requests.get(phase, {}).get("ns"))
        for batch in model.get("batch_stats", []):
            for phase in EXECUTION_PHASES:
                total[f"execution_{phase}_count"] += _number(batch.get(phase, {}).get("count"))
                total[f"execution_{phase}_ns"] += _number(batch.get(phase, {}).get("ns"))
    return totals


def _ms(ns: int, count: int) -> float | None:
    return ns / count / 1e6 if count > 0 else None


def triton_deltas(before: Mapping[str, Any], after: Mapping[str, Any], frames: int) -> dict[str, dict[str, Any]]:
    """Per model that executed between two readings of Triton's statistics (JSON, as triton_statistics gives):
    its inferences (batch items), executions and requests; mean batch (inferences per execution); each phase's
    ms per request (a batched request counts its batch's whole compute), the compute phases' ms per execution,
    and per frame of the job: the requests' queueing and the executions' compute, added up over the window.
    A phase Triton timed nothing for in the window is None."""
    at_start = _model_totals(before)
    deltas: dict[str, dict[str, Any]] = {}
    for name, total in sorted(_model_totals(after).items()):
        # Counter subtraction keeps positive counts only: a tritonserver restarted in the window, whose counts
        # started again, shows at most what it ran since.
        delta = total - at_start.get(name, Counter())
        executions = delta["execution_count"]
        if executions == 0:
            continue
        deltas[name] = {
            "inference_count": delta["inference_count"],
            "execution_count": executions,
            "requests": delta["requests"],
            "mean_batch": delta["inference_count"] / executions,
            "ms_per_request": {
                phase: _ms(delta[f"request_{phase}_ns"], delta[f"request_{phase}_count"]) for phase in TRITON_PHASES
            },
            "ms_per_execution": {
                phase: _ms(delta[f"execution_{phase}_ns"], delta[f"execution_{phase}_count"])
                for phase in EXECUTION_PHASES
            },
            "ms_per_frame": {
                "queue": _ms(delta["request_queue_ns"], frames) if delta["request_queue_count"] else None,
                **{
                    phase: _ms(delta[f"execution_{phase}_ns"], frames) if delta[f"execution_{phase}_count"] else None
                    for phase in EXECUTION_PHASES
                },
            },
        }
    return deltas


@dataclass(frozen=True)
class WorkerCounts:
    frames: float = 0.0
    chunks: float = 0.0


def worker_counts(metrics_text: str) -> WorkerCounts:
    """A worker's frames and ended chunks (every outcome) from its /metrics text."""
    totals = {WORKER_FRAMES_METRIC: 0.0, WORKER_CHUNKS_METRIC: 0.0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name in totals:
            totals[family.name] += sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return WorkerCounts(totals[WORKER_FRAMES_METRIC], totals[WORKER_CHUNKS_METRIC])


def gpu_shares(
    worker_gpus: Sequence[int | None], before: Sequence[WorkerCounts], after: Sequence[WorkerCounts]
) -> dict[str, dict[str, float]]:
    """Per GPU (as the stack numbers them): its workers' frames and chunks between two readings, and their shares
    of all workers' (the issue wants 40-60% each of two GPUs). Empty without a GPU."""
    gpus = sorted({str(gpu) for gpu in worker_gpus if gpu is not None})
    frames = dict.fromkeys(gpus, 0.0)
    chunks = dict.fromkeys(gpus, 0.0)
    for gpu, start, end in zip(worker_gpus, before, after, strict=True):
        if gpu is not None:
            frames[str(gpu)] += end.frames - start.frames
            chunks[str(gpu)] += end.chunks - start.chunks
    all_frames, all_chunks = sum(frames.values()), sum(chunks.values())
    return {
        gpu: {
            "frames": frames[gpu],
            "chunks": chunks[gpu],
            "frame_share": frames[gpu] / all_frames if all_frames else 0.0,
            "chunk_share": chunks[gpu] / all_chunks if all_chunks else 0.0,
        }
        for gpu in gpus
    }


def read_worker_counts(addresses: Sequence[str]) -> list[WorkerCounts]:
    counts = []
    for address in addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            counts.append(worker_counts(response.read().decode()))
    return counts


def choose_visible_gpus(devices: str, environment: MutableMapping[str, str]) -> None:
    """Shows the whole stack (this process and every child) only `devices`, numbered as NVML numbers them."""
    environment[CUDA_VISIBLE_DEVICES] = devices
    environment[CUDA_DEVICE_ORDER[0]] = CUDA_DEVICE_ORDER[1]


class JobTimer:
    """Runs one job through a JobClient and measures it with the samplers (and Triton's statistics, given its URL)."""

    def __init__(
        self,
        client: JobClient,
        sampler: NvmlSampler | None,
        source_png: bytes,
        triton_url: str | None = None,
        worker_gpus: Sequence[int | None] = (),
        worker_metrics: Sequence[str] = (),
    ) -> None:
        self._client, self._sampler, self._source_png = client, sampler, source_png
        self._triton_url = triton_url
        # Each worker's GPU and its /metrics address, in the same order: each GPU's share of a job's work.
        self._worker_gpus, self._worker_metrics = worker_gpus, worker_metrics
        self._cores = CoreCounter()

    def run(self, video: Path, clip: Clip, download: Path | None = None) -> dict[str, Any]:
        triton_before = triton_statistics(self._triton_url) if self._triton_url else None
        workers_before = read_worker_counts(self._worker_metrics)
        self._cores.begin()
        cpu_before = descendant_cpu_seconds()
        started = time.monotonic()
        submitted_at = time.time()
        job = self._client.submit(self._source_png, target_path=video, selector=clip.selector)  # type: ignore[arg-type]
        for event in self._client.watch(job.id):
            if event.state in FINAL_STATES:
                break
        finished_at = time.monotonic()
        busy = self._cores.end()
        cpu_after = descendant_cpu_seconds()
        triton_after = triton_statistics(self._triton_url) if self._triton_url else None
        workers_after = read_worker_counts(self._worker_metrics)
        finished = self._client.get(job.id)
        if finished.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            raise SystemExit(
                f"{clip.name}: the job ended {jobs_pb2.JobState.Name(finished.state)}: {finished.error.message}"
            )
        report = json.loads(finished.report_json)
        wall = finished.finished_at.ToMicroseconds() / 1e6 - submitted_at
        window: GpuWindow | None = None
        per_gpu: dict[int, GpuWindow] = {}
        if self._sampler is not None:
            window = summarise_window(self._sampler.samples, started, finished_at)
            per_gpu = summarise_gpus(self._sampler.samples, started, finished_at)
        result: dict[str, Any] = {
            "clip": clip.name,
            "frames": report["frames"],
            "wall_seconds": wall,
            "fps": report["frames"] / wall,
            "final_event_seconds": finished_at - started,
            "pipeline_seconds": report["wall_seconds"],
            "pipeline_fps": report["frames"] / report["wall_seconds"],
            "chunks": report["chunks"],
            "faces": report.get("faces"),
            "ms_per_frame": stage_ms(report),
            "cpu_cores_busy": busy,
            "cpu_ms_per_frame_by_process": cpu_ms_per_frame(cpu_before, cpu_after, report["frames"]),
            "gpu": dataclasses.asdict(window) if window is not None else None,
            "gpus": {str(gpu): dataclasses.asdict(gpu_window) for gpu, gpu_window in per_gpu.items()},
            "gpu_shares": gpu_shares(self._worker_gpus, workers_before, workers_after),
            "triton": (
                triton_deltas(triton_before, triton_after, report["frames"])
                if triton_before is not None and triton_after is not None
                else None
            ),
            "report": {key: value for key, value in report.items() if key != "events"},
        }
        if download is not None:
            output = self._client.fetch(job.id, jobs_pb2.ARTIFACT_OUTPUT, download)
            result["output_frames"] = count_video_frames(output)
        return result


@dataclass(frozen=True)
class StackShape:
    """How the embedded stack is laid out for one column: workers, frame-service processes, extra settings."""

    workers: int
    replicas: int = 1
    env: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        settings = "".join(f", {key.removeprefix('SWAPLINE_')}={value}" for key, value in self.env)
        return f"services, {self.workers} worker(s), {self.replicas} of each frame service{settings}"


def parse_env(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE arguments as pairs; a pair without '=' is refused."""
    parsed = []
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise argparse.ArgumentTypeError(f"--env takes KEY=VALUE, got {pair!r}")
        parsed.append((key, value))
    return tuple(parsed)


def concurrent_throughput(timer: JobTimer, client: JobClient, video: Path, clip: Clip, jobs: int) -> dict[str, Any]:
    """`jobs` copies of one clip submitted at once: frames of all of them over first submit to last output."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.time()
    cores = CoreCounter()
    cores.begin()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda _: timer.run(video, clip), range(jobs)))
    ends = [started + result["wall_seconds"] for result in results]
    frames = sum(result["frames"] for result in results)
    wall = max(ends) - started
    return {
        "clip": clip.name,
        "jobs": jobs,
        "frames": frames,
        "wall_seconds": wall,
        "fps": frames / wall,
        "cpu_cores_busy": cores.end(),
    }


PROFILED_PROCESSES = ("worker-0", "encoder", "decoder", "gateway")
STUB_BINARY = "triton_python_backend_stub"


def triton_stubs(triton_pid: int) -> dict[str, int]:
    """tritonserver's Python-backend stubs by model and instance ("stub-<model>-<n>"): its children running the stub."""
    stubs: dict[str, int] = {}
    for entry in sorted(Path("/proc").iterdir(), key=lambda path: path.name):
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent != triton_pid or not arguments[0].endswith(STUB_BINARY.encode()) or len(arguments) < 2:
            continue
        model = Path(arguments[1].decode()).parent.parent.name
        number = sum(1 for name in stubs if name.startswith(f"stub-{model}-"))
        stubs[f"stub-{model}-{number}"] = int(entry.name)
    return stubs


@contextmanager
def sampling_profiles(stack: EmbeddedStack, profile_dir: Path | None, name: str) -> Iterator[None]:
    """With a profile_dir and py-spy on PATH: samples the stack's first worker, encoder, decoder, gateway and Triton's
    Python-backend stubs while the block runs, as collapsed stacks (`py-spy record --format raw`, one file each), to
    show where their CPU goes."""
    spy = shutil.which("py-spy")
    if profile_dir is None or spy is None:
        yield
        return
    profile_dir.mkdir(parents=True, exist_ok=True)
    processes = {process: stack.pid(process) for process in PROFILED_PROCESSES}
    processes.update(triton_stubs(stack.pid(TRITON_NAME)))
    recorders = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(profile_dir / f"{name}-{process}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for process, pid in processes.items()
    ]
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders:
            recorder.wait(timeout=30)


def run_services(
    media: dict[str, Path],
    clips: Sequence[Clip],
    shape: StackShape,
    work_dir: Path,
    sampler: NvmlSampler | None,
    source_png: bytes,
    samples: dict[str, np.ndarray],
    concurrent_jobs: int = 0,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    options = StackOptions(
        work_dir=work_dir,
        media_root=work_dir / "media",
        workers=shape.workers,
        frame_service_replicas=shape.replicas,
        worker_batch_size=WORKER_BATCH_SIZE,
        startup_timeout=600.0,
        extra_env={"SWAPLINE_GATEWAY_CHUNK_SECONDS": str(CHUNK_SECONDS), **dict(shape.env)},
        # Triton runs in this process, not as a service of the stack: --env reaches it through here.
        triton_gpu_instances=gpu_instances_from_env({**os.environ, **dict(shape.env)}),
        triton_cuda_wait=cuda_wait_from_env({**os.environ, **dict(shape.env)}),
    )
    started = time.monotonic()
    with EmbeddedStack(options) as stack, JobClient(stack.gateway_address) as client:
        startup = time.monotonic() - started
        triton_url = stack.triton.grpc_url if stack.triton is not None else None
        # Which GPU each worker is on, as the stack placed them.
        layout = stack.layout
        worker_metrics = [stack.metrics_address(f"worker-{index}") for index in range(layout.workers)]
        timer = JobTimer(client, sampler, source_png, triton_url, layout.worker_gpus, worker_metrics)
        warm_up_started = time.monotonic()
        timer.run(media[clips[0].name], clips[0])
        warm_up = time.monotonic() - warm_up_started
        jobs = []
        for clip in clips:
            output = work_dir / f"output-{clip.name}.mp4"
            profiled = profile_dir if clip is clips[0] else None
            with sampling_profiles(stack, profiled, f"{shape.workers}x{shape.replicas}-{clip.name}"):
                result = timer.run(media[clip.name], clip, download=output)
            expected = probe_media(media[clip.name]).frame_count
            result["frames_ok"] = result["output_frames"] == expected == result["frames"]
            if clip.name not in samples:
                samples[clip.name] = sample_output_frames(output)
            jobs.append(result)
            print_job(shape.label, result)
        throughput = None
        if concurrent_jobs:
            throughput = concurrent_throughput(timer, client, media[clips[0].name], clips[0], concurrent_jobs)
            print(
                f"{shape.label}: {concurrent_jobs} {clips[0].name} jobs at once, {throughput['fps']:.1f} fps",
                flush=True,
            )
    return {
        "workers": shape.workers,
        "replicas": shape.replicas,
        "env": dict(shape.env),
        "triton_gpu_instances": options.triton_gpu_instances,
        "visible_gpus": os.environ.get(CUDA_VISIBLE_DEVICES),
        "worker_gpus": list(layout.worker_gpus),
        "label": shape.label,
        "startup_seconds": startup,
        "warm_up_seconds": warm_up,
        "jobs": jobs,
        "concurrent": throughput,
    }


def print_job(name: str, result: dict[str, Any]) -> None:
    gpu = result.get("gpu") or {}
    stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in result["ms_per_frame"].items())
    print(
        f"{name}, {result['clip']}: {result['fps']:.1f} fps end to end ({result['frames']} frames in"
        f" {result['wall_seconds']:.2f} s; pipeline {result['pipeline_fps']:.1f} fps), GPU"
        f" {gpu.get('utilisation_mean', float('nan')):.0f}% mean / {gpu.get('utilisation_max', float('nan')):.0f}% max,"
        f" NVDEC {gpu.get('decoder_utilisation_mean') or 0:.0f}%, {result['cpu_cores_busy']:.1f} cores busy;"
        f" ms/frame: {stages}",
        flush=True,
    )


def judge_samples(path: Path) -> dict[str, Any]:
    """The identity judge (dlib, where it is installed) on the kept frames: how many show the source face."""
    from tests.support.identity_judge import SAME_PERSON_DISTANCE, IdentityJudge

    judge = IdentityJudge()
    source = judge.descriptor(sample_media.grace_hopper_photo())
    if source is None:
        raise SystemExit("the identity judge finds no face in the source photo")
    verdicts: dict[str, Any] = {}
    with np.load(path) as kept:
        for clip in kept.files:
            distances = []
            for frame in kept[clip]:
                found = judge.descriptor(frame)
                distances.append(None if found is None else float(judge.distance(found, source)))
            verdicts[clip] = {
                "distances": distances,
                "source_identity_frames": sum(1 for d in distances if d is not None and d < SAME_PERSON_DISTANCE),
            }
    return verdicts


def _figure(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _services_label(entry: dict[str, Any]) -> str:
    """A services column's label; runs recorded before labels existed only give their workers."""
    return str(entry.get("label", f"services, {entry['workers']} worker(s)"))


def summary_table(record: dict[str, Any]) -> str:
    """The runs of one gpu_bench JSON as a Markdown table: a row per job, services then in-process."""
    rows = [
        "| run | clip | fps, submit to joined output | pipeline fps | GPU util. mean / max % | NVDEC % | GPU memory GiB"
        " | cores busy | decode | detect | swap | paste | encode (ms/frame) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    runs = [(_services_label(entry), job) for entry in record["services"] for job in entry["jobs"]]
    in_process = record.get("in_process")
    if in_process:
        runs += [(f"one process, {in_process['concurrency']} chunks at once", job) for job in in_process["jobs"]]
    for name, job in runs:
        gpu = job.get("gpu") or {}
        memory = gpu.get("memory_used_max_bytes")
        stages = " | ".join(f"{job['ms_per_frame'][stage]:.1f}" for stage in STAGE_NAMES)
        rows.append(
            f"| {name} | {job['clip']} | {job['fps']:.1f} | {_figure(job.get('pipeline_fps'), 1)}"
            f" | {_figure(gpu.get('utilisation_mean'))} / {_figure(gpu.get('utilisation_max'))}"
            f" | {_figure(gpu.get('decoder_utilisation_mean'))}"
            f" | {_figure(memory / 2**30 if memory is not None else None, 1)}"
            f" | {job['cpu_cores_busy']:.1f} | {stages} |"
        )
    return "\n".join(rows)


def triton_summary(record: dict[str, Any]) -> list[str]:
    """Per services job that recorded Triton's statistics: a heading, then one line per model."""
    lines = []
    for entry in record["services"]:
        for job in entry["jobs"]:
            models = job.get("triton")
            if not models:
                continue
            lines.append(f"Triton, {_services_label(entry)}, {job['clip']}:")
            for name, model in models.items():
                lines.append(
                    f"  {name}: {model['execution_count']} executions, mean batch {model['mean_batch']:.1f}"
                    f" ({model['requests'] / model['execution_count']:.1f} requests),"
                    f" queue {_figure(model['ms_per_request']['queue'], 2)} ms/request,"
                    f" infer {_figure(model['ms_per_execution']['compute_infer'], 2)} ms/execution"
                    f" ({_figure(model['ms_per_frame']['compute_infer'], 2)} ms/frame)"
                )
    return lines


def per_gpu_summary(record: dict[str, Any]) -> list[str]:
    """Per services job that recorded several GPUs or their shares: each GPU's utilisation and share of the work."""
    lines = []
    for entry in record["services"]:
        for job in entry["jobs"]:
            gpus, shares = job.get("gpus") or {}, job.get("gpu_shares") or {}
            if len(gpus) < 2 and not shares:
                continue
            lines.append(f"Per GPU, {_services_label(entry)}, {job['clip']}:")
            for gpu in sorted({*gpus, *shares}, key=int):
                window, share = gpus.get(gpu, {}), shares.get(gpu)
                work = (
                    f", {share['frame_share']:.0%} of the frames ({share['frames']:.0f}),"
                    f" {share['chunk_share']:.0%} of the chunks ({share['chunks']:.0f})"
                    if share is not None
                    else ""
                )
                utilisation = f"{_figure(window.get('utilisation_mean'))} / {_figure(window.get('utilisation_max'))}%"
                lines.append(f"  GPU {gpu}: util. {utilisation}{work}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.bench.gpu_bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/gpu-bench/gpu-bench.json"))
    parser.add_argument("--workdir", type=Path, default=Path("build/gpu-bench"))
    parser.add_argument("--media", type=Path, default=Path("build/gpu-media"))
    parser.add_argument("--seconds", type=float, default=20.0, help="clip length")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--clips", nargs="+", choices=CLIP_NAMES, default=list(CLIP_NAMES))
    parser.add_argument("--replicas", type=int, default=1, help="processes of each frame service")
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for every service of the stack")
    parser.add_argument("--concurrent-jobs", type=int, default=0, help="also time this many jobs at once")
    parser.add_argument("--profile-dir", type=Path, help="py-spy profiles of a worker, the encoder and the decoder")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument(
        "--visible-gpus",
        help="CUDA_VISIBLE_DEVICES for the whole stack, e.g. 0 or 0,1 (NVML's numbering); default: every GPU",
    )
    parser.add_argument(
        "--sized-to-gpus",
        action="store_true",
        help="one stack with the workers and frame-service processes sized to the visible GPUs and cores "
        "(services/cli/gpu_layout.py) instead of --workers and --replicas",
    )
    parser.add_argument("--judge", type=Path, help="only judge the frames kept by an earlier run (needs dlib)")
    parser.add_argument("--summarise", type=Path, help="only print an earlier run's JSON as a Markdown table")
    args = parser.parse_args(argv)
    if args.judge is not None:
        print(json.dumps(judge_samples(args.judge), indent=2))
        return 0
    if args.summarise is not None:
        earlier = json.loads(args.summarise.read_text())
        print("\n".join([summary_table(earlier), *triton_summary(earlier), *per_gpu_summary(earlier)]))
        return 0
    if args.visible_gpus is not None:
        choose_visible_gpus(args.visible_gpus, os.environ)
    if args.sized_to_gpus:
        sized = plan_gpu_layout(probe_cuda().device_count, available_cores())
        args.workers, args.replicas = [sized.workers], sized.frame_service_replicas
    # In the order given: the first is the one profiled.
    clips = [next(clip for clip in CLIPS if clip.name == name) for name in dict.fromkeys(args.clips)]
    made = time.monotonic()
    media = prepare_media(args.media.resolve(), args.seconds, clips)
    print(
        f"media ready in {time.monotonic() - made:.1f} s: {', '.join(path.name for path in media.values())}", flush=True
    )
    source_png = (args.media / SOURCE_FACE).read_bytes()
    try:
        sampler: NvmlSampler | None = NvmlSampler().start()
    except Exception as error:  # no NVML: a CPU machine
        print(f"no GPU sampling: {error}", flush=True)
        sampler = None
    record: dict[str, Any] = {"machine": machine_description(), "clip_seconds": args.seconds, "services": []}
    samples: dict[str, np.ndarray] = {}
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        env = parse_env(args.env)
        for workers in args.workers:
            shape = StackShape(workers, args.replicas, env)
            work_dir = args.workdir.resolve() / f"stack-{workers}x{args.replicas}"
            record["services"].append(
                run_services(
                    media, clips, shape, work_dir, sampler, source_png, samples, args.concurrent_jobs, args.profile_dir
                )
            )
            write_json(out, record)
        if not args.skip_in_process:
            from services.bench.in_process_gpu import run_in_process

            record["in_process"] = run_in_process(media, clips, source_png, max(args.workers), sampler)
    finally:
        if sampler is not None:
            sampler.stop()
        write_json(out, record)
        if samples:
            kept = out.with_name("judge-samples.npz")
            partial = temporary_path(kept)
            with partial.open("wb") as stream:
                np.savez_compressed(stream, **samples)
            os.replace(partial, kept)
    return 0


def write_json(path: Path, record: dict[str, Any]) -> None:
    write_file(path, json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())

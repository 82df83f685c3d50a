"""`python -m services.bench.precision_sweep`: FP16 against FP32 (TF32 off), and TF32, at batch sizes 1 to
64, through Triton and in torch alone, for the inswapper_128 STAND-IN (random weights) and the MTCNN nets.

Each model is served at each precision as its own model (`<model>_<precision>`) by the embedded
tritonserver from its torch definition (torch_python_model.py), with no dynamic batching, so each
request runs at the batch size it was sent with; a gRPC client keeps several requests in flight so
the GPU never waits for the next one. Then the same modules run alone in this process on the same
device, inputs already there: the ceiling the served figures are read against. Every cell is
timed for a bounded time after a warm-up and reports the median repeat; a deadline stops starting
new cells (they are listed as skipped), so a run fits its device call. Parity: each precision's
outputs against FP32's on identical inputs, through Triton and in torch, as PSNR and max abs error;
and the served FP32 outputs against torch's.

Writes the JSON to --out (through a temporary name) and prints the tables. On a GPU machine:
    python -m services.bench.precision_sweep --device cuda --repository triton_models --out X.json
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn
from tritonclient.grpc import model_config_pb2

from services.bench.sweep_figures import (
    BASELINE_PRECISION,
    FP16_TARGET_RATIO,
    SWEEP_PATHS,
    Cell,
    ParityFigure,
    RepeatPolicy,
    SweepPath,
    Throughput,
    parity_figures,
    parity_record,
    parse_batches,
    parse_choices,
    precision_ratios,
    render_tables,
    sweep_report,
    timed_repeats,
)
from services.common.errors import InvalidArgument
from services.common.media_paths import temporary_path
from services.common.torch_catalog import BUILT_IN_FACTORIES, TORCH_PRECISIONS, TorchPrecision
from services.common.torch_runtime import load_torch_model, run_module, use_precision
from services.common.triton_client import TritonClient
from services.common.triton_shared_memory import PoolLimits
from services.model_build import inswapper_standin
from services.model_build.mtcnn_nets import STAGE_INPUT_SIDE, MtcnnStage
from services.model_build.torch_models import torch_model_from_config
from services.triton.embedded_repository import TRITON_DEVICES, TritonDevice, write_torch_model
from services.triton.model_config import read_model_config, require_torch_weights
from services.triton.server_process import EmbeddedTriton

SweepModelName = Literal["inswapper_standin", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"]
SWEEP_MODEL_NAMES: tuple[SweepModelName, ...] = get_args(SweepModelName)
# "grpc": tensors in the gRPC payload (tritonclient's default); "shared-memory": through /dev/shm
# regions, as the services send them on one node (falls back to gRPC where /dev/shm is too small).
Transport = Literal["grpc", "shared-memory"]
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)
STANDIN_MODEL: SweepModelName = "inswapper_standin"

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
STANDIN_FACTORY = "services.model_build.inswapper_standin:new_inswapper_standin"
TINY_STANDIN_FACTORY = "services.model_build.inswapper_standin:new_tiny_inswapper_standin"
MTCNN_STAGE_OF: dict[SweepModelName, MtcnnStage] = {"mtcnn_pnet": "pnet", "mtcnn_rnet": "rnet", "mtcnn_onet": "onet"}
DEFAULT_BATCHES = "1,2,4,8,16,32,64"
# P-Net scans frames the detector scales to 640 on their long side: 640x360 for 16:9 video.
DEFAULT_FRAME = "640x360"
PARITY_BATCH = 8
INPUT_SEED = 0
DEFAULT_IN_FLIGHT = 4
# Requests in flight hold their tensors in the client, the server and the stub at once; a P-Net batch
# of 64 frames is 177 MB, so large requests get fewer in flight.
IN_FLIGHT_BYTES = 512 << 20
REQUEST_TIMEOUT_SECONDS = 300.0
STARTUP_TIMEOUT_SECONDS = 180.0
# No new cell starts after this many seconds, Triton's start-up included: on an H200 the whole sweep
# takes about 3 minutes, and a slower start still leaves it inside 4.
DEFAULT_DEADLINE_SECONDS = 200.0
SHARED_MEMORY_LIMITS = PoolLimits(max_bytes=4 << 30)

InputMaker = Callable[[int], list[np.ndarray]]


@dataclass(frozen=True)
class SweepModel:
    name: SweepModelName
    label: str
    unit: str
    factory: str
    weights: Path | None
    # The contract served and run: tensors and max_batch_size; no dynamic batching.
    config: model_config_pb2.ModelConfig
    # Per output, the PSNR peak where the range is fixed (None: the FP32 reference's own range).
    peaks: Mapping[str, float | None]
    # batch -> the inputs in the config's order; the same seed every time, so precisions see the same.
    # Cached: a P-Net batch of 64 frames takes a second to draw; the arrays are only ever read.
    make_inputs: InputMaker
    # Multiply-adds an item costs, where counted (the stand-in): throughput becomes achieved TFLOPS.
    multiply_adds: int | None = None

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.config.input]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.config.output]


def served_name(model: str, precision: TorchPrecision) -> str:
    return f"{model}_{precision}"


def parse_frame(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT ("640x360") as (height, width)."""
    width, separator, height = text.partition("x")
    if not (separator and width.isdigit() and height.isdigit() and int(width) >= 12 and int(height) >= 12):
        raise InvalidArgument(f"frame size {text!r} is not WIDTHxHEIGHT of at least 12x12 (P-Net's window)")
    return int(height), int(width)


def sweep_config(config: model_config_pb2.ModelConfig, max_batch: int) -> model_config_pb2.ModelConfig:
    """The contract without dynamic batching (a request runs at the batch it was sent with), taking `max_batch`."""
    swept = model_config_pb2.ModelConfig()
    swept.CopyFrom(config)
    swept.ClearField("dynamic_batching")
    swept.max_batch_size = max_batch
    return swept


def standin_config(max_batch: int) -> model_config_pb2.ModelConfig:
    """inswapper_128's tensors: float32 crops and latents in, float32 crops out."""
    fp32 = model_config_pb2.TYPE_FP32
    crop = [3, inswapper_standin.CROP_SIDE, inswapper_standin.CROP_SIDE]
    config = model_config_pb2.ModelConfig(name=STANDIN_MODEL, max_batch_size=max_batch)
    target_name, source_name = inswapper_standin.INPUT_NAMES
    config.input.add(name=target_name, data_type=fp32, dims=crop)
    config.input.add(name=source_name, data_type=fp32, dims=[inswapper_standin.LATENT_SIZE])
    (output_name,) = inswapper_standin.OUTPUT_NAMES
    config.output.add(name=output_name, data_type=fp32, dims=crop)
    return config


def standin_inputs(batch: int) -> list[np.ndarray]:
    return [tensor.numpy() for tensor in inswapper_standin.example_inputs(batch, INPUT_SEED)]


def pixel_inputs(height: int, width: int) -> InputMaker:
    """Raw RGB 0..255 images in float32, as the detector sends them."""

    def make(batch: int) -> list[np.ndarray]:
        generator = np.random.default_rng(INPUT_SEED)
        return [generator.integers(0, 256, (batch, 3, height, width)).astype(np.float32)]

    return make


def sweep_model(
    name: SweepModelName, repository: Path, max_batch: int, frame: tuple[int, int], tiny_standin: bool
) -> SweepModel:
    if name == STANDIN_MODEL:
        factory = TINY_STANDIN_FACTORY if tiny_standin else STANDIN_FACTORY
        width = inswapper_standin.TINY_WIDTH if tiny_standin else 1.0
        label = inswapper_standin.STANDIN_LABEL + (f" at {width:g} of its width" if tiny_standin else "")
        (output_name,) = inswapper_standin.OUTPUT_NAMES
        return SweepModel(
            name=name,
            label=label,
            unit="faces",
            factory=factory,
            weights=None,
            config=standin_config(max_batch),
            peaks={output_name: 1.0},
            make_inputs=cache(standin_inputs),
            multiply_adds=inswapper_standin.standin_multiply_adds(width),
        )
    stage = MTCNN_STAGE_OF[name]
    side = STAGE_INPUT_SIDE[stage]
    height, width = (side, side) if side else frame
    what = f"{width}x{height} frames" if side is None else f"{side}x{side} crops"
    return SweepModel(
        name=name,
        label=f"MTCNN {stage} on {what}",
        unit="frames" if side is None else "crops",
        factory=BUILT_IN_FACTORIES[name],
        weights=require_torch_weights(repository, name),
        config=sweep_config(read_model_config(repository, name), max_batch),
        peaks={"probability": 1.0},
        make_inputs=cache(pixel_inputs(height, width)),
    )


@dataclass
class Deadline:
    """No new cell after `at` (monotonic seconds); the cells not started are listed."""

    at: float
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def allows(self, model: str, path: SweepPath, precision: TorchPrecision, batch: int) -> bool:
        if time.monotonic() < self.at:
            return True
        self.skipped.append({"model": model, "path": path, "precision": precision, "batch": batch})
        return False


@dataclass
class SweepResults:
    cells: list[Cell] = field(default_factory=list)
    parity: list[ParityFigure] = field(default_factory=list)
    # model -> precision -> the outputs for the parity inputs, per path.
    answers: dict[SweepPath, dict[str, dict[TorchPrecision, dict[str, np.ndarray]]]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    triton: dict[str, Any] = field(default_factory=dict)

    def fail(
        self,
        path: SweepPath,
        error: Exception,
        model: str | None = None,
        precision: TorchPrecision | None = None,
        batch: int | None = None,
    ) -> None:
        """Device time is scarce: a failed cell (or phase) is recorded and the sweep goes on."""
        message = f"{type(error).__name__}: {error}"
        self.errors.append({"path": path, "model": model, "precision": precision, "batch": batch, "error": message})

    def keep_answers(
        self, path: SweepPath, model: SweepModel, answers: dict[TorchPrecision, dict[str, np.ndarray]]
    ) -> None:
        self.answers.setdefault(path, {})[model.name] = answers
        reference = answers.get(BASELINE_PRECISION)
        if reference is None:
            return
        for precision, candidate in answers.items():
            if precision != BASELINE_PRECISION:
                self.parity += parity_figures(model.name, path, precision, reference, candidate, model.peaks)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory_used_mb(device: torch.device) -> float | None:
    """Memory in use on the whole device, every process's (Triton's stubs included); None on the CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


def tf32_allowed() -> bool:
    return bool(torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32)


def time_module(
    module: nn.Module, tensors: Sequence[torch.Tensor], device: torch.device, batch: int, policy: RepeatPolicy
) -> Throughput:
    """Calls back to back, then one synchronisation: the GPU is never left waiting on Python."""

    def run(calls: int) -> None:
        with torch.inference_mode():
            for _ in range(calls):
                module(*tensors)
        synchronise(device)

    return timed_repeats(run, batch, policy)


def sweep_torch(
    model: SweepModel,
    module: nn.Module,
    precisions: Sequence[TorchPrecision],
    batches: Sequence[int],
    device: torch.device,
    policy: RepeatPolicy,
    deadline: Deadline,
    results: SweepResults,
) -> None:
    """The module alone at each precision and batch, its inputs already on `device`."""
    answers: dict[TorchPrecision, dict[str, np.ndarray]] = {}
    for precision in precisions:
        try:
            prepared = torch_model_from_config(model.name, copy.deepcopy(module), model.config, device, precision)
            answers[precision] = run_module(prepared, model.make_inputs(min(PARITY_BATCH, max(batches))))
        except Exception as error:
            results.fail("torch", error, model.name, precision)
            continue
        compute_dtype = next(prepared.module.parameters()).dtype
        for batch in batches:
            if not deadline.allows(model.name, "torch", precision, batch):
                continue
            try:
                use_precision(precision)
                inputs = model.make_inputs(batch)
                tensors = [torch.from_numpy(array).to(device=device, dtype=compute_dtype) for array in inputs]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                throughput = time_module(prepared.module, tensors, device, batch, policy)
            except Exception as error:
                results.fail("torch", error, model.name, precision, batch)
                continue
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            results.cells.append(Cell(model.name, "torch", precision, batch, throughput, tf32_allowed(), peak))
        del prepared
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.keep_answers("torch", model, answers)


def in_flight_for(request_bytes: int, wanted: int) -> int:
    """`wanted`, fewer for requests so large that that many would hold more than IN_FLIGHT_BYTES; at least 1."""
    return max(1, min(wanted, IN_FLIGHT_BYTES // max(request_bytes, 1)))


async def send_requests(
    client: TritonClient,
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    count: int,
    in_flight: int,
) -> None:
    """`count` identical requests, at most `in_flight` outstanding at once; returns when all are answered."""
    slots = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with slots:
            await client.infer(model, inputs, outputs)

    await asyncio.gather(*(one() for _ in range(count)))


def time_requests(
    runner: asyncio.Runner,
    client: TritonClient,
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    batch: int,
    policy: RepeatPolicy,
    in_flight: int,
) -> Throughput:
    def run(calls: int) -> None:
        runner.run(send_requests(client, model, inputs, outputs, calls, in_flight))

    return timed_repeats(run, batch, policy, min_calls=in_flight)


def repository_writer(
    models: Sequence[SweepModel], precisions: Sequence[TorchPrecision]
) -> Callable[[Path, TritonDevice], list[str]]:
    """EmbeddedTriton's repository writer: every model at every precision, as `<model>_<precision>`."""

    def write(out: Path, device: TritonDevice) -> list[str]:
        names = []
        for model in models:
            for precision in precisions:
                name = served_name(model.name, precision)
                write_torch_model(out, name, model.config, model.factory, model.weights, precision, device)
                names.append(name)
        return names

    return write


def sweep_served_model(
    runner: asyncio.Runner,
    client: TritonClient,
    model: SweepModel,
    precisions: Sequence[TorchPrecision],
    batches: Sequence[int],
    device: torch.device,
    policy: RepeatPolicy,
    deadline: Deadline,
    in_flight: int,
    results: SweepResults,
) -> None:
    """One model's served precisions: the parity request first (it also warms the model up), then each batch."""
    answers: dict[TorchPrecision, dict[str, np.ndarray]] = {}
    parity_inputs = dict(zip(model.input_names, model.make_inputs(min(PARITY_BATCH, max(batches))), strict=True))
    for precision in precisions:
        name = served_name(model.name, precision)
        try:
            answers[precision] = runner.run(client.infer(name, parity_inputs, model.output_names))
        except Exception as error:
            results.fail("triton", error, model.name, precision)
            continue
        for batch in batches:
            if not deadline.allows(model.name, "triton", precision, batch):
                continue
            inputs = dict(zip(model.input_names, model.make_inputs(batch), strict=True))
            flying = in_flight_for(sum(array.nbytes for array in inputs.values()), in_flight)
            try:
                throughput = time_requests(runner, client, name, inputs, model.output_names, batch, policy, flying)
            except Exception as error:
                results.fail("triton", error, model.name, precision, batch)
                continue
            sent = "shared-memory" if client.uses_shared_memory else "grpc"
            memory = device_memory_used_mb(device)
            results.cells.append(
                Cell(model.name, "triton", precision, batch, throughput, precision == "tf32", memory, sent)
            )
    results.keep_answers("triton", model, answers)


def sweep_triton(
    models: Sequence[SweepModel],
    precisions: Sequence[TorchPrecision],
    batches: Sequence[int],
    device: torch.device,
    policy: RepeatPolicy,
    deadline: Deadline,
    work_dir: Path,
    transport: Transport,
    in_flight: int,
    results: SweepResults,
) -> None:
    """Every model at every precision served by one embedded tritonserver, timed from a gRPC client."""
    served_device: TritonDevice = "cuda" if device.type == "cuda" else "cpu"
    started = time.monotonic()
    with (
        EmbeddedTriton(
            # The production repository, which only the default writer reads: this one writes its own models.
            REPOSITORY_ROOT / "triton_models",
            work_dir,
            startup_timeout=STARTUP_TIMEOUT_SECONDS,
            device=served_device,
            repository_writer=repository_writer(models, precisions),
        ) as triton,
        asyncio.Runner() as runner,
    ):
        results.triton["startup_seconds"] = round(time.monotonic() - started, 2)
        results.triton["served_on"] = triton.device
        results.triton["models"] = list(triton.models)
        client = runner.run(open_client(triton.grpc_url, transport))
        try:
            for model in models:
                sweep_served_model(
                    runner, client, model, precisions, batches, device, policy, deadline, in_flight, results
                )
        finally:
            runner.run(client.close())


async def open_client(url: str, transport: Transport) -> TritonClient:
    """Made inside the runner's loop, which its gRPC channel belongs to."""
    return TritonClient(url, REQUEST_TIMEOUT_SECONDS, transport == "shared-memory", SHARED_MEMORY_LIMITS)


def served_against_torch(results: SweepResults, models: Sequence[SweepModel]) -> list[dict[str, Any]]:
    """The FP32 outputs served by Triton against torch's FP32 outputs: the server runs the same module."""
    records = []
    for model in models:
        served = results.answers.get("triton", {}).get(model.name, {}).get(BASELINE_PRECISION)
        local = results.answers.get("torch", {}).get(model.name, {}).get(BASELINE_PRECISION)
        if served is not None and local is not None:
            for figure in parity_figures(model.name, "triton", BASELINE_PRECISION, local, served, model.peaks):
                records.append(parity_record(figure))
    return records


def environment(device: torch.device) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    on_cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_cuda else f"cpu ({platform.processor() or 'unknown'})",
        "device_memory_mb": torch.cuda.get_device_properties(device).total_memory / 2**20 if on_cuda else None,
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_cuda else None,
        "numpy": np.__version__,
        "tritonclient": version("tritonclient"),
        "nvidia-pytriton": version("nvidia-pytriton"),
        # What torch allows before the sweep sets them per precision: fp32 cells run with TF32 off.
        "tf32_defaults": {
            "cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        },
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "dev_shm_mb": shutil.disk_usage("/dev/shm").total / 2**20,
    }


def achieved_tflops(cells: Sequence[Cell], models: Sequence[SweepModel]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> path -> precision -> the best cell's arithmetic rate, for models whose cost is counted."""
    costs: dict[str, int] = {model.name: model.multiply_adds for model in models if model.multiply_adds}
    best: dict[str, dict[str, dict[str, float]]] = {}
    for cell in cells:
        cost = costs.get(cell.model)
        if cost is None:
            continue
        rate = round(2 * cost * cell.throughput.items_per_second / 1e12, 2)
        by_precision = best.setdefault(cell.model, {}).setdefault(cell.path, {})
        by_precision[cell.precision] = max(rate, by_precision.get(cell.precision, 0.0))
    return best


def summary(results: SweepResults, models: Sequence[SweepModel]) -> dict[str, Any]:
    """The acceptance figures: FP16/FP32 of the stand-in through Triton per batch, whether parity held,
    and the best arithmetic rate reached (against the GPU's peak: how close to what the hardware allows)."""
    standin_ratios = {
        ratio.batch: round(ratio.over_fp32, 3)
        for ratio in precision_ratios(results.cells)
        if ratio.model == STANDIN_MODEL and ratio.path == "triton" and ratio.precision == "fp16"
    }
    best = max(standin_ratios.values(), default=None)
    return {
        "standin_triton_fp16_over_fp32": standin_ratios,
        "standin_triton_fp16_best_ratio": best,
        "standin_triton_fp16_meets_target": None if best is None else best >= FP16_TARGET_RATIO,
        "parity_holds": all(figure.holds for figure in results.parity) if results.parity else None,
        "best_tflops": achieved_tflops(results.cells, models),
    }


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_path(path)
    try:
        partial.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.bench.precision_sweep", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON report is written")
    parser.add_argument("--device", choices=TRITON_DEVICES, default="cuda")
    parser.add_argument("--batches", default=DEFAULT_BATCHES, help="comma-separated batch sizes")
    parser.add_argument("--precisions", default=",".join(TORCH_PRECISIONS))
    parser.add_argument("--models", default=",".join(SWEEP_MODEL_NAMES))
    parser.add_argument("--paths", default=",".join(SWEEP_PATHS), help="triton, torch or both")
    parser.add_argument(
        "--repository",
        type=Path,
        default=REPOSITORY_ROOT / "triton_models",
        help="model repository with the MTCNN configs and the model.pt files `make models` writes",
    )
    parser.add_argument("--frame", default=DEFAULT_FRAME, help="P-Net's frame size, WIDTHxHEIGHT")
    parser.add_argument("--tiny-standin", action="store_true", help="the stand-in at 1/32 width (CPU runs, tests)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="grpc")
    parser.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT, help="requests outstanding at once")
    parser.add_argument("--cell-seconds", type=float, default=RepeatPolicy.cell_seconds)
    parser.add_argument("--min-repeats", type=int, default=RepeatPolicy.min_repeats)
    parser.add_argument("--deadline-seconds", type=float, default=DEFAULT_DEADLINE_SECONDS)
    parser.add_argument("--work-dir", type=Path, help="tritonserver's folder (default: a temporary one)")
    return parser


def run_sweep(argv: Sequence[str]) -> tuple[dict[str, Any], Path]:
    """Runs what the command line `argv` asks for; returns the report and where it is to be written."""
    arguments = build_parser().parse_args(argv)
    started = time.monotonic()
    device = torch.device(arguments.device)
    batches = parse_batches(arguments.batches)
    precisions = parse_choices(arguments.precisions, TORCH_PRECISIONS, "precision")
    paths = parse_choices(arguments.paths, SWEEP_PATHS, "path")
    names = parse_choices(arguments.models, SWEEP_MODEL_NAMES, "model")
    if arguments.in_flight < 1:
        raise InvalidArgument(f"--in-flight {arguments.in_flight} is not at least 1")
    frame = parse_frame(arguments.frame)
    env = environment(device)
    policy = RepeatPolicy(cell_seconds=arguments.cell_seconds, min_repeats=arguments.min_repeats)
    deadline = Deadline(started + arguments.deadline_seconds)
    models = [sweep_model(name, arguments.repository, max(batches), frame, arguments.tiny_standin) for name in names]
    modules = {model.name: load_torch_model(model.factory, model.weights) for model in models}
    results = SweepResults()
    # Triton first: its figures are the ones the acceptance reads.
    if "triton" in paths:
        with tempfile.TemporaryDirectory(prefix="precision-sweep-") as scratch:
            work_dir = arguments.work_dir or Path(scratch)
            try:
                sweep_triton(
                    models,
                    precisions,
                    batches,
                    device,
                    policy,
                    deadline,
                    work_dir,
                    arguments.transport,
                    arguments.in_flight,
                    results,
                )
            except Exception as error:  # the server did not start, or died: what was measured is still written
                results.fail("triton", error)
    if "torch" in paths:
        for model in models:
            sweep_torch(model, modules[model.name], precisions, batches, device, policy, deadline, results)
    settings = {
        "command": " ".join(["python -m services.bench.precision_sweep", *argv]),
        "batches": list(batches),
        "precisions": list(precisions),
        "paths": list(paths),
        "frame": arguments.frame,
        "transport": arguments.transport,
        "in_flight": arguments.in_flight,
        "policy": asdict(policy),
        "deadline_seconds": arguments.deadline_seconds,
        "parity_batch": min(PARITY_BATCH, max(batches)),
    }
    described: dict[str, dict[str, Any]] = {
        model.name: {
            "label": model.label,
            "unit": model.unit,
            "factory": model.factory,
            "weights": str(model.weights) if model.weights else "random (seeded)",
            "parameters": sum(parameter.numel() for parameter in modules[model.name].parameters()),
            "multiply_adds_per_item": model.multiply_adds,
        }
        for model in models
    }
    extra = {
        "triton": results.triton,
        "served_against_torch": served_against_torch(results, models),
        "skipped": deadline.skipped,
        "errors": results.errors,
        "summary": summary(results, models),
        "seconds": round(time.monotonic() - started, 1),
    }
    return sweep_report(env, settings, described, results.cells, results.parity, extra), arguments.out


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the report and prints its tables; exits 1 if any cell or the server failed."""
    report, out = run_sweep(sys.argv[1:] if argv is None else argv)
    write_json(out, report)
    print(render_tables(report))
    print(f"summary: {json.dumps(report['summary'])}")
    for failure in report["errors"]:
        where = " ".join(str(failure[key]) for key in ("path", "model", "precision", "batch") if failure[key])
        print(f"failed: {where}: {failure['error']}", file=sys.stderr)
    if report["skipped"]:
        print(f"{len(report['skipped'])} cells skipped at the deadline", file=sys.stderr)
    print(f"wrote {out} in {report['seconds']} s")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

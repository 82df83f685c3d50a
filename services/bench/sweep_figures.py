"""The precision sweep's figures: time-bounded repeats, parity (PSNR), FP16/FP32 ratios, the JSON report
and its tables. Pure functions over numbers and arrays, so they are tested without a GPU or a server.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from services.common.errors import InvalidArgument
from services.common.torch_catalog import TORCH_PRECISIONS, TorchPrecision

# "triton": requests from a gRPC client to the embedded tritonserver; "torch": the module alone in this
# process on the same device, inputs already there: the ceiling the served figure is read against.
SweepPath = Literal["triton", "torch"]
SWEEP_PATHS: tuple[SweepPath, ...] = get_args(SweepPath)

BASELINE_PRECISION: TorchPrecision = "fp32"
# The swapper's FP16 twin is held to this against FP32 (tests/model_build/test_swapper_model.py).
PARITY_PSNR_DB = 40.0
# Issue 11's acceptance: FP16 at least twice FP32 on the production-sized swapper in Triton.
FP16_TARGET_RATIO = 2.0
MAX_CALLS_PER_REPEAT = 1000

Choice = TypeVar("Choice", bound=str)


@dataclass(frozen=True)
class RepeatPolicy:
    """How long a cell is timed: warm-up calls, then repeats of several calls until `cell_seconds`
    have passed (at least `min_repeats`, at most `max_repeats`); a repeat lasts about `repeat_seconds`."""

    warmup_calls: int = 2
    min_repeats: int = 3
    max_repeats: int = 15
    cell_seconds: float = 0.4
    repeat_seconds: float = 0.1


@dataclass(frozen=True)
class Throughput:
    items_per_second: float  # the median repeat
    slowest: float
    fastest: float
    repeats: int
    calls_per_repeat: int


def timed_repeats(
    run: Callable[[int], None],
    items_per_call: int,
    policy: RepeatPolicy,
    min_calls: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> Throughput:
    """Times `run(calls)`, which makes `calls` calls and returns once all have finished.

    The warm-up's time per call sets how many calls make a repeat (at least `min_calls`: a client
    keeping several requests in flight needs that many to fill them); the figure is the median repeat.
    """
    warmup_calls = max(policy.warmup_calls, min_calls)
    started = clock()
    run(warmup_calls)
    call_seconds = max((clock() - started) / warmup_calls, 1e-9)
    calls = min(MAX_CALLS_PER_REPEAT, max(min_calls, math.ceil(policy.repeat_seconds / call_seconds)))
    rates: list[float] = []
    deadline = clock() + policy.cell_seconds
    while len(rates) < policy.min_repeats or (len(rates) < policy.max_repeats and clock() < deadline):
        started = clock()
        run(calls)
        rates.append(items_per_call * calls / max(clock() - started, 1e-9))
    return Throughput(statistics.median(rates), min(rates), max(rates), len(rates), calls)


@dataclass(frozen=True)
class Cell:
    """One model at one precision and batch size on one path."""

    model: str
    path: SweepPath
    precision: TorchPrecision
    batch: int
    throughput: Throughput
    # Whether cuDNN and cuBLAS were allowed TF32 (read back from torch on the torch path; what the
    # served model's precision sets on the Triton path).
    tf32: bool
    # The torch path: torch's peak allocation during the cell. The Triton path: NVML's memory used on
    # the whole device (every stub of the server) at the cell's end. None on the CPU.
    memory_mb: float | None
    # The Triton path: "grpc" or "shared-memory", as the client actually sent; None on the torch path.
    transport: str | None = None


@dataclass(frozen=True)
class ParityFigure:
    """One output of `precision` against the same output at FP32, on identical inputs."""

    model: str
    path: SweepPath
    precision: TorchPrecision
    output: str
    psnr_db: float
    max_abs_error: float
    nonfinite: int

    @property
    def holds(self) -> bool:
        return self.nonfinite == 0 and self.psnr_db >= PARITY_PSNR_DB


def psnr_db(reference: np.ndarray, candidate: np.ndarray, peak: float) -> float:
    """Peak signal-to-noise ratio of `candidate` against `reference`; inf when identical, nan with a nan."""
    if reference.shape != candidate.shape:
        raise InvalidArgument(f"PSNR of shapes {reference.shape} and {candidate.shape}")
    if peak <= 0:
        raise InvalidArgument(f"PSNR peak {peak} is not positive")
    error = float(np.mean((candidate.astype(np.float64) - reference.astype(np.float64)) ** 2))
    if error == 0:
        return math.inf
    return 10 * math.log10(peak**2 / error)


def reference_peak(reference: np.ndarray, peak: float | None) -> float:
    """The given peak (outputs with a fixed range: images and probabilities in 0..1), else the
    reference's own range (box regressions, landmarks); 1 for a constant reference."""
    if peak is not None:
        return peak
    span = float(np.max(reference) - np.min(reference)) if reference.size else 0.0
    return span if span > 0 else 1.0


def parity_figures(
    model: str,
    path: SweepPath,
    precision: TorchPrecision,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    peaks: Mapping[str, float | None],
) -> list[ParityFigure]:
    figures = []
    for output, expected in reference.items():
        answer = candidate[output].astype(np.float64)
        finite = np.isfinite(answer)
        difference = np.abs(answer - expected.astype(np.float64))
        figures.append(
            ParityFigure(
                model=model,
                path=path,
                precision=precision,
                output=output,
                psnr_db=psnr_db(expected, answer, reference_peak(expected, peaks.get(output))),
                max_abs_error=float(np.max(difference)) if finite.all() else math.nan,
                nonfinite=int(np.count_nonzero(~finite)),
            )
        )
    return figures


@dataclass(frozen=True)
class Ratio:
    """Throughput at a precision over FP32 (TF32 off) for one model, path and batch size."""

    model: str
    path: SweepPath
    batch: int
    precision: TorchPrecision
    over_fp32: float


def precision_ratios(cells: Iterable[Cell]) -> list[Ratio]:
    """Every non-FP32 cell against the FP32 cell of the same model, path and batch, where both were run."""
    cells = list(cells)
    baseline = {
        (cell.model, cell.path, cell.batch): cell.throughput.items_per_second
        for cell in cells
        if cell.precision == BASELINE_PRECISION
    }
    ratios = []
    for cell in cells:
        reference = baseline.get((cell.model, cell.path, cell.batch))
        if cell.precision != BASELINE_PRECISION and reference:
            ratios.append(
                Ratio(cell.model, cell.path, cell.batch, cell.precision, cell.throughput.items_per_second / reference)
            )
    return ratios


def parse_batches(text: str) -> tuple[int, ...]:
    """Comma-separated batch sizes ("1,2,4") as a tuple: positive, distinct, in the order given."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise InvalidArgument(f"batch sizes {text!r} are not a comma-separated list of positive integers")
    batches = tuple(int(part) for part in parts)
    if min(batches) <= 0 or len(set(batches)) != len(batches):
        raise InvalidArgument(f"batch sizes {text!r} must be positive and distinct")
    return batches


def parse_choices(text: str, choices: tuple[Choice, ...], what: str) -> tuple[Choice, ...]:
    """Comma-separated names ("a,b") as a tuple: each one of `choices`, distinct, in the order given."""
    chosen = []
    for part in (part.strip() for part in text.split(",")):
        matching = [choice for choice in choices if choice == part]
        if not matching:
            raise InvalidArgument(f"{what} {part!r} is not one of {', '.join(choices)}")
        if matching[0] in chosen:
            raise InvalidArgument(f"{what} {part!r} is given twice")
        chosen.append(matching[0])
    return tuple(chosen)


def _json_number(value: float) -> float | str:
    """JSON has no inf or nan: those become the strings "inf" and "nan"."""
    return value if math.isfinite(value) else str(value)


def cell_record(cell: Cell) -> dict[str, Any]:
    record = asdict(cell)
    record["throughput"] = asdict(cell.throughput)
    return record


def parity_record(figure: ParityFigure) -> dict[str, Any]:
    record: dict[str, Any] = asdict(figure)
    record["psnr_db"] = _json_number(figure.psnr_db)
    record["max_abs_error"] = _json_number(figure.max_abs_error)
    record["holds"] = figure.holds
    return record


def sweep_report(
    environment: Mapping[str, Any],
    settings: Mapping[str, Any],
    models: Mapping[str, Mapping[str, Any]],
    cells: Sequence[Cell],
    parity: Sequence[ParityFigure],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON the sweep writes: what ran where, every cell, every ratio, every parity figure."""
    return {
        "environment": dict(environment),
        "settings": dict(settings),
        "models": {name: dict(details) for name, details in models.items()},
        "parity_psnr_db_threshold": PARITY_PSNR_DB,
        "fp16_target_ratio": FP16_TARGET_RATIO,
        "cells": [cell_record(cell) for cell in cells],
        "ratios": [asdict(ratio) for ratio in precision_ratios(cells)],
        "parity": [parity_record(figure) for figure in parity],
        **extra,
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _error(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def render_tables(report: Mapping[str, Any]) -> str:
    """Per model: items/s by batch size, per path the precisions and FP16/FP32; then the parity figures.

    Reads the report's JSON form, so a saved report renders the same tables."""
    rates = {
        (cell["model"], cell["path"], cell["precision"], cell["batch"]): cell["throughput"]["items_per_second"]
        for cell in report["cells"]
    }
    ordered = [BASELINE_PRECISION, *(precision for precision in TORCH_PRECISIONS if precision != BASELINE_PRECISION)]
    precisions = [precision for precision in ordered if any(key[2] == precision for key in rates)]
    lines = []
    for name, details in report["models"].items():
        paths = [path for path in SWEEP_PATHS if any(key[0] == name and key[1] == path for key in rates)]
        batches = sorted({key[3] for key in rates if key[0] == name})
        if not paths:
            continue
        lines.append(f"{details['label']}: {details['unit']}/s")
        header = ["batch"]
        for path in paths:
            header += [f"{path} {precision}" for precision in precisions] + [f"{path} fp16/fp32"]
        rows = [header]
        for batch in batches:
            row = [str(batch)]
            for path in paths:
                row += [_rate(rates.get((name, path, precision, batch))) for precision in precisions]
                fp16, fp32 = rates.get((name, path, "fp16", batch)), rates.get((name, path, "fp32", batch))
                row.append(f"{fp16 / fp32:.2f}x" if fp16 and fp32 else "-")
            rows.append(row)
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines += ["  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
        lines.append("")
    if report["parity"]:
        threshold = report["parity_psnr_db_threshold"]
        lines.append(f"Parity against FP32 on identical inputs (holds: PSNR >= {threshold} dB):")
        for figure in report["parity"]:
            psnr = figure["psnr_db"]
            psnr_text = psnr if isinstance(psnr, str) else f"{psnr:.1f}"
            lines.append(
                f"  {figure['model']:<18} {figure['path']:<6} {figure['precision']:<4} {figure['output']:<12} "
                f"PSNR {psnr_text:>6} dB  max abs {_error(figure['max_abs_error'])}  "
                f"{'holds' if figure['holds'] else 'FAILS'}"
            )
    return "\n".join(lines)

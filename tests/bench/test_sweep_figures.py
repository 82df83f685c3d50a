from __future__ import annotations

import json
import math

import numpy as np
import pytest

from services.bench.sweep_figures import (
    Cell,
    ParityFigure,
    RepeatPolicy,
    SweepPath,
    Throughput,
    parity_figures,
    parse_batches,
    parse_choices,
    precision_ratios,
    psnr_db,
    reference_peak,
    render_tables,
    sweep_report,
    timed_repeats,
)
from services.common.errors import InvalidArgument
from services.common.torch_catalog import TORCH_PRECISIONS, TorchPrecision


class FakeClock:
    """A clock that only `run` moves: each call takes the next of `call_seconds` (the last one repeats)."""

    def __init__(self, call_seconds: list[float]) -> None:
        self.now = 0.0
        self.call_seconds = call_seconds
        self.calls: list[int] = []

    def __call__(self) -> float:
        return self.now

    def run(self, calls: int) -> None:
        self.calls.append(calls)
        seconds = self.call_seconds[min(len(self.calls) - 1, len(self.call_seconds) - 1)]
        self.now += calls * seconds


def test_psnr_of_a_known_error() -> None:
    reference = np.zeros((2, 3, 4, 4), np.float32)
    assert psnr_db(reference, reference + 0.01, peak=1.0) == pytest.approx(40.0)
    assert psnr_db(reference, reference + 0.1, peak=1.0) == pytest.approx(20.0)
    assert psnr_db(reference, reference + 0.1, peak=10.0) == pytest.approx(40.0)
    assert psnr_db(reference, reference.copy(), peak=1.0) == math.inf


def test_psnr_refuses_mismatched_shapes_and_a_non_positive_peak() -> None:
    with pytest.raises(InvalidArgument):
        psnr_db(np.zeros(4), np.zeros(5), 1.0)
    with pytest.raises(InvalidArgument):
        psnr_db(np.zeros(4), np.zeros(4), 0.0)


def test_the_peak_is_the_given_one_else_the_references_range() -> None:
    reference = np.array([-3.0, 1.0, 5.0])
    assert reference_peak(reference, 1.0) == 1.0
    assert reference_peak(reference, None) == 8.0
    assert reference_peak(np.full(3, 2.0), None) == 1.0


def test_parity_figures_per_output_and_a_nan_never_holds() -> None:
    reference = {"probability": np.full((4, 2), 0.5), "regression": np.linspace(-1, 1, 8).reshape(4, 2)}
    close = {"probability": reference["probability"] + 1e-3, "regression": reference["regression"] + 1e-3}
    figures = parity_figures("net", "torch", "fp16", reference, close, {"probability": 1.0})
    assert [figure.output for figure in figures] == ["probability", "regression"]
    assert figures[0].psnr_db == pytest.approx(60.0)
    # The regression's range is 2, so the same error is 6 dB further below its peak.
    assert figures[1].psnr_db == pytest.approx(20 * math.log10(2 / 1e-3))
    assert all(figure.holds for figure in figures)
    assert figures[0].max_abs_error == pytest.approx(1e-3)
    broken = {"probability": reference["probability"].copy(), "regression": reference["regression"].copy()}
    broken["regression"][1, 0] = np.nan
    (_, nan_figure) = parity_figures("net", "torch", "fp16", reference, broken, {})
    assert nan_figure.nonfinite == 1 and not nan_figure.holds and math.isnan(nan_figure.max_abs_error)
    far = {name: array + 0.1 for name, array in reference.items()}
    assert not parity_figures("net", "torch", "fp16", reference, far, {"probability": 1.0})[0].holds


def test_repeats_are_sized_from_the_warm_up_and_bounded_by_time() -> None:
    clock = FakeClock([0.01])
    policy = RepeatPolicy(warmup_calls=2, min_repeats=3, max_repeats=50, cell_seconds=1.0, repeat_seconds=0.1)
    throughput = timed_repeats(clock.run, items_per_call=8, policy=policy, clock=clock)
    # A warm-up of 2 calls, then repeats of 10 calls (0.1 s) until 1 s has passed.
    assert clock.calls[0] == 2 and set(clock.calls[1:]) == {10}
    assert throughput.calls_per_repeat == 10 and throughput.repeats == 10
    assert throughput.items_per_second == pytest.approx(800.0)


def test_slow_calls_still_get_the_minimum_repeats_and_the_median() -> None:
    # Warm-up at 1 s a call; then repeats of 3, 1 and 2 s: more than the cell's time, still three.
    clock = FakeClock([1.0, 3.0, 1.0, 2.0])
    policy = RepeatPolicy(warmup_calls=1, min_repeats=3, max_repeats=10, cell_seconds=0.5, repeat_seconds=0.1)
    throughput = timed_repeats(clock.run, items_per_call=4, policy=policy, clock=clock)
    assert throughput.repeats == 3 and throughput.calls_per_repeat == 1
    assert (throughput.slowest, throughput.items_per_second, throughput.fastest) == pytest.approx((4 / 3, 2.0, 4.0))


def test_requests_in_flight_set_the_least_calls_a_repeat_makes() -> None:
    clock = FakeClock([1.0])
    policy = RepeatPolicy(warmup_calls=1, min_repeats=1, max_repeats=1, cell_seconds=0.0)
    throughput = timed_repeats(clock.run, items_per_call=1, policy=policy, min_calls=4, clock=clock)
    assert clock.calls == [4, 4] and throughput.calls_per_repeat == 4


def test_the_fast_repeats_stop_at_the_maximum() -> None:
    clock = FakeClock([0.001])
    policy = RepeatPolicy(warmup_calls=1, min_repeats=1, max_repeats=4, cell_seconds=100.0, repeat_seconds=0.01)
    assert timed_repeats(clock.run, 1, policy, clock=clock).repeats == 4


def _cell(model: str, path: SweepPath, precision: TorchPrecision, batch: int, rate: float) -> Cell:
    throughput = Throughput(rate, rate, rate, 3, 1)
    return Cell(model, path, precision, batch, throughput, precision == "tf32", None)


def test_ratios_pair_each_precision_with_fp32_of_the_same_model_path_and_batch() -> None:
    cells = [
        _cell("swapper", "triton", "fp32", 64, 100.0),
        _cell("swapper", "triton", "fp16", 64, 250.0),
        _cell("swapper", "triton", "tf32", 64, 150.0),
        _cell("swapper", "torch", "fp16", 64, 900.0),  # no torch fp32 cell: no ratio
        _cell("swapper", "triton", "fp16", 32, 120.0),  # no fp32 at batch 32
    ]
    ratios = {(ratio.path, ratio.batch, ratio.precision): ratio.over_fp32 for ratio in precision_ratios(cells)}
    assert ratios == {("triton", 64, "fp16"): 2.5, ("triton", 64, "tf32"): 1.5}


def test_batches_and_choices_parse_or_fail_clearly() -> None:
    assert parse_batches("1,2,4,64") == (1, 2, 4, 64)
    assert parse_batches(" 8 , 2") == (8, 2)
    for text in ("", "0,1", "1,1", "a", "1.5", "-1"):
        with pytest.raises(InvalidArgument):
            parse_batches(text)
    assert parse_choices("fp32,fp16", TORCH_PRECISIONS, "precision") == ("fp32", "fp16")
    for text in ("fp8", "fp32,fp32", ""):
        with pytest.raises(InvalidArgument):
            parse_choices(text, TORCH_PRECISIONS, "precision")


def _report() -> dict[str, object]:
    cells = [
        _cell("standin", "triton", "fp32", 1, 50.0),
        _cell("standin", "triton", "fp16", 1, 100.0),
        _cell("standin", "torch", "fp32", 1, 60.0),
        _cell("standin", "torch", "fp16", 1, 180.0),
    ]
    parity = [
        ParityFigure("standin", "triton", "fp16", "output", 52.5, 0.004, 0),
        ParityFigure("standin", "torch", "tf32", "output", math.inf, 0.0, 0),
        ParityFigure("standin", "torch", "fp16", "output", math.nan, math.nan, 3),
    ]
    models = {"standin": {"label": "inswapper_128 stand-in (random weights)", "unit": "faces"}}
    return sweep_report({"device": "test"}, {"batches": [1]}, models, cells, parity, {"summary": {}})


def test_the_report_is_strict_json_with_cells_ratios_and_parity() -> None:
    report = _report()
    decoded = json.loads(json.dumps(report, allow_nan=False))
    assert decoded["environment"] == {"device": "test"}
    assert len(decoded["cells"]) == 4 and decoded["cells"][0]["throughput"]["items_per_second"] == 50.0
    assert {(ratio["path"], ratio["over_fp32"]) for ratio in decoded["ratios"]} == {("triton", 2.0), ("torch", 3.0)}
    assert [figure["psnr_db"] for figure in decoded["parity"]] == [52.5, "inf", "nan"]
    assert [figure["holds"] for figure in decoded["parity"]] == [True, True, False]


def test_tables_show_rates_ratios_and_parity_from_the_json_form() -> None:
    text = render_tables(json.loads(json.dumps(_report(), allow_nan=False)))
    lines = text.splitlines()
    assert lines[0] == "inswapper_128 stand-in (random weights): faces/s"
    header = lines[1].split()
    assert header[:3] == ["batch", "triton", "fp32"]
    row = lines[2].split()
    assert row[0] == "1" and "2.00x" in row and "3.00x" in row
    assert any("52.5 dB" in line and "holds" in line for line in lines)
    assert any("nan" in line and "FAILS" in line for line in lines)

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from tritonclient.grpc import model_config_pb2

from services.bench.precision_sweep import (
    IN_FLIGHT_BYTES,
    Deadline,
    SweepModel,
    SweepResults,
    in_flight_for,
    main,
    parse_frame,
    served_name,
    standin_config,
    sweep_config,
    sweep_torch,
)
from services.bench.sweep_figures import RepeatPolicy
from services.common.errors import InvalidArgument
from services.common.torch_runtime import save_state_dict
from services.model_build.inswapper_standin import TINY_WIDTH, standin_multiply_adds
from services.model_build.torch_models import new_mtcnn_rnet
from services.triton.model_config import read_model_config, torch_weights_path

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"
QUICK = ["--cell-seconds", "0.02", "--min-repeats", "1", "--device", "cpu", "--batches", "1,2"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """R-Net's production config and a model.pt of its (untrained) torch definition, as `make models` lays out."""
    path = tmp_path_factory.mktemp("repository")
    (path / "mtcnn_rnet").mkdir()
    shutil.copy(PRODUCTION_REPOSITORY / "mtcnn_rnet" / "config.pbtxt", path / "mtcnn_rnet" / "config.pbtxt")
    save_state_dict(new_mtcnn_rnet(), torch_weights_path(path, "mtcnn_rnet"))
    return path


def _sweep(tmp_path: Path, repository: Path, *arguments: str) -> tuple[int, dict]:
    out = tmp_path / "sweep.json"
    code = main(["--out", str(out), "--repository", str(repository), "--tiny-standin", *QUICK, *arguments])
    return code, json.loads(out.read_text())


def _cells(report: dict) -> set[tuple[str, str, str, int]]:
    return {(cell["model"], cell["path"], cell["precision"], cell["batch"]) for cell in report["cells"]}


def test_frames_parse_as_height_and_width() -> None:
    assert parse_frame("640x360") == (360, 640)
    for text in ("640", "640x", "x360", "8x8", "640x360x3", "axb"):
        with pytest.raises(InvalidArgument):
            parse_frame(text)


def test_large_requests_get_fewer_in_flight_but_never_none() -> None:
    assert in_flight_for(1 << 20, 4) == 4
    assert in_flight_for(IN_FLIGHT_BYTES // 2, 4) == 2
    assert in_flight_for(IN_FLIGHT_BYTES * 3, 4) == 1


def test_swept_configs_run_each_request_at_its_own_batch() -> None:
    production = read_model_config(PRODUCTION_REPOSITORY, "mtcnn_pnet")
    assert production.HasField("dynamic_batching") and production.max_batch_size == 32
    swept = sweep_config(production, 64)
    assert not swept.HasField("dynamic_batching") and swept.max_batch_size == 64
    assert [tensor.name for tensor in swept.input] == ["image"]
    assert production.HasField("dynamic_batching"), "the production config is left as it was"


def test_the_standin_is_served_with_inswapper_128s_tensors() -> None:
    config = standin_config(64)
    fp32 = model_config_pb2.TYPE_FP32
    assert [(tensor.name, tensor.data_type, list(tensor.dims)) for tensor in config.input] == [
        ("target", fp32, [3, 128, 128]),
        ("source", fp32, [512]),
    ]
    assert [(tensor.name, tensor.data_type, list(tensor.dims)) for tensor in config.output] == [
        ("output", fp32, [3, 128, 128])
    ]
    assert config.max_batch_size == 64 and not config.HasField("dynamic_batching")
    assert served_name("inswapper_standin", "fp16") == "inswapper_standin_fp16"


def test_the_deadline_lists_the_cells_it_stops() -> None:
    open_deadline, passed = Deadline(time.monotonic() + 60), Deadline(time.monotonic() - 1)
    assert open_deadline.allows("m", "torch", "fp16", 8) and open_deadline.skipped == []
    assert not passed.allows("m", "triton", "fp32", 4)
    assert passed.skipped == [{"model": "m", "path": "triton", "precision": "fp32", "batch": 4}]


class FailsAtBatchOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.shape[0] == 1:
            raise RuntimeError("out of memory, say")
        return values * self.scale


def test_a_failing_cell_is_recorded_and_the_others_still_run() -> None:
    config = model_config_pb2.ModelConfig(name="doubler", max_batch_size=2)
    config.input.add(name="values", data_type=model_config_pb2.TYPE_FP32, dims=[4])
    config.output.add(name="scaled", data_type=model_config_pb2.TYPE_FP32, dims=[4])
    model = SweepModel(
        name="mtcnn_rnet",
        label="test module",
        unit="rows",
        factory="unused:unused",
        weights=None,
        config=config,
        peaks={},
        make_inputs=lambda batch: [np.ones((batch, 4), np.float32)],
    )
    results = SweepResults()
    policy = RepeatPolicy(warmup_calls=1, min_repeats=1, cell_seconds=0.0)
    deadline = Deadline(time.monotonic() + 60)
    sweep_torch(model, FailsAtBatchOne(), ["fp32"], [1, 2], torch.device("cpu"), policy, deadline, results)
    assert [(cell.batch, cell.precision) for cell in results.cells] == [(2, "fp32")]
    (failure,) = results.errors
    assert failure["batch"] == 1 and failure["path"] == "torch" and "out of memory, say" in failure["error"]


def test_a_tiny_cpu_run_of_the_torch_path(tmp_path: Path, repository: Path) -> None:
    code, report = _sweep(
        tmp_path,
        repository,
        "--paths",
        "torch",
        "--models",
        "inswapper_standin,mtcnn_rnet",
        "--precisions",
        "fp32,fp16",
    )
    assert code == 0 and report["errors"] == [] and report["skipped"] == []
    expected = {
        (model, "torch", precision, batch)
        for model in ("inswapper_standin", "mtcnn_rnet")
        for precision in ("fp32", "fp16")
        for batch in (1, 2)
    }
    assert _cells(report) == expected
    for cell in report["cells"]:
        assert cell["throughput"]["items_per_second"] > 0
        assert cell["tf32"] is False and cell["memory_mb"] is None and cell["transport"] is None
    assert {(ratio["model"], ratio["batch"]) for ratio in report["ratios"]} == {
        (model, batch) for model in ("inswapper_standin", "mtcnn_rnet") for batch in (1, 2)
    }
    outputs = {(figure["model"], figure["output"]) for figure in report["parity"]}
    assert outputs == {("inswapper_standin", "output"), ("mtcnn_rnet", "probability"), ("mtcnn_rnet", "regression")}
    assert all(figure["holds"] and figure["precision"] == "fp16" for figure in report["parity"])
    standin = report["models"]["inswapper_standin"]
    assert "stand-in" in standin["label"] and standin["weights"] == "random (seeded)"
    assert report["models"]["mtcnn_rnet"]["weights"].endswith("mtcnn_rnet/1/model.pt")
    assert report["environment"]["device"].startswith("cpu") and report["environment"]["torch"] == torch.__version__
    assert report["summary"]["parity_holds"] is True
    # Counted for the stand-in only: faces/s times its multiply-adds.
    fp32_rate = next(
        cell["throughput"]["items_per_second"]
        for cell in report["cells"]
        if cell["model"] == "inswapper_standin" and cell["precision"] == "fp32"
    )
    assert standin["multiply_adds_per_item"] == standin_multiply_adds(TINY_WIDTH)
    assert report["models"]["mtcnn_rnet"]["multiply_adds_per_item"] is None
    assert set(report["summary"]["best_tflops"]) == {"inswapper_standin"}
    assert report["summary"]["best_tflops"]["inswapper_standin"]["torch"]["fp32"] >= round(
        2 * standin_multiply_adds(TINY_WIDTH) * fp32_rate / 1e12, 2
    )


def test_a_tiny_cpu_run_through_a_real_tritonserver(tmp_path: Path, repository: Path) -> None:
    code, report = _sweep(
        tmp_path,
        repository,
        *("--models", "inswapper_standin", "--precisions", "fp32,fp16", "--batches", "1", "--in-flight", "2"),
    )
    assert code == 0 and report["errors"] == []
    assert report["triton"]["models"] == ["inswapper_standin_fp32", "inswapper_standin_fp16"]
    assert report["triton"]["served_on"] == "cpu"
    triton_cells = [cell for cell in report["cells"] if cell["path"] == "triton"]
    assert {(cell["precision"], cell["batch"]) for cell in triton_cells} == {("fp32", 1), ("fp16", 1)}
    assert all(cell["transport"] == "grpc" and cell["throughput"]["calls_per_repeat"] >= 2 for cell in triton_cells)
    (triton_parity,) = [figure for figure in report["parity"] if figure["path"] == "triton"]
    assert triton_parity["precision"] == "fp16" and triton_parity["holds"]
    # The server runs the very module torch runs: its FP32 answers are torch's, up to the order in which the
    # process's oneDNN threads sum a deep stack of convolutions (seen at 2.5e-5 on a CI machine); another module,
    # or the FP16 one, would differ by 1e-3 or more.
    (served,) = report["served_against_torch"]
    assert served["output"] == "output" and served["max_abs_error"] < 2e-4
    assert set(report["summary"]["standin_triton_fp16_over_fp32"]) == {"1"}

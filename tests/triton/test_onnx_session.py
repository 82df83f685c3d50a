from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.triton.onnx_session import (
    execution_providers,
    group_by_shape,
    intra_op_threads,
    open_onnx_session,
    run_batched,
)

PRODUCTION_REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"


def test_cuda_comes_first_when_present_and_cpu_is_always_there() -> None:
    assert execution_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert execution_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert execution_providers(["AzureExecutionProvider"]) == ["CPUExecutionProvider"]


def test_intra_op_threads_prefers_the_config_parameter_over_the_environment() -> None:
    environ = {"SWAPLINE_ORT_INTRA_OP_THREADS": "4"}
    assert intra_op_threads("2", environ) == 2
    assert intra_op_threads(None, environ) == 4
    assert intra_op_threads("", environ) == 4
    assert intra_op_threads(None, {}) == 0
    with pytest.raises(ValueError, match="not an integer"):
        intra_op_threads("many", {})
    with pytest.raises(ValueError, match="negative"):
        intra_op_threads("-1", {})


def test_requests_group_by_everything_but_batch_size() -> None:
    def request(batch: int, height: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
        return {"image": np.zeros((batch, 3, height, 20), dtype)}

    requests = [request(1, 12), request(4, 24), request(2, 12), request(1, 12, np.float16), request(3, 24)]
    assert group_by_shape(requests) == [[0, 2], [1, 4], [3]]


def test_one_batched_call_equals_separate_calls() -> None:
    session = open_onnx_session(PRODUCTION_REPOSITORY / "mtcnn_onet" / "1" / "model.onnx", threads=1)
    rng = np.random.default_rng(3)
    requests = [{"image": rng.uniform(0, 255, (batch, 3, 48, 48)).astype(np.float32)} for batch in (1, 5, 2)]
    outputs = ["probability", "regression", "landmarks"]

    batched = run_batched(session, requests, outputs)

    assert len(batched) == len(requests)
    for inputs, result in zip(requests, batched, strict=True):
        alone = session.run(outputs, inputs)
        for name, expected in zip(outputs, alone, strict=True):
            assert result[name].flags.c_contiguous
            assert result[name].shape == expected.shape
            np.testing.assert_allclose(result[name], expected, atol=1e-5)


def test_only_the_requested_outputs_are_computed() -> None:
    session = open_onnx_session(PRODUCTION_REPOSITORY / "mtcnn_onet" / "1" / "model.onnx")
    (result,) = run_batched(session, [{"image": np.zeros((2, 3, 48, 48), np.float32)}], ["landmarks"])
    assert list(result) == ["landmarks"]
    assert result["landmarks"].shape == (2, 10)

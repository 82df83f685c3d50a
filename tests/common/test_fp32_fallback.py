"""The FP32-twin rule every model reader shares, on a recording stand-in for Triton."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.common.errors import FailedPrecondition
from services.common.fp32_fallback import NonFiniteOutputs, infer_with_fp32_twin, non_finite_outputs, widened


class _Recording:
    """Answers each model with its `answers` value and records what each was sent."""

    def __init__(self, answers: Mapping[str, float]) -> None:
        self._answers = answers
        self.sent: list[tuple[str, dict[str, np.dtype]]] = []

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.sent.append((model, {name: tensor.dtype for name, tensor in inputs.items()}))
        return {"out": np.full(2, self._answers[model], np.float32)}


async def _read(model: str, answer: Mapping[str, np.ndarray]) -> str:
    if not np.isfinite(answer["out"]).all():
        raise non_finite_outputs(f"model {model}")
    return model


INPUTS: dict[str, np.ndarray] = {"pixels": np.zeros(2, np.uint8), "latent": np.zeros(2, np.float16)}


def test_a_finite_answer_is_read_without_the_twin() -> None:
    runner = _Recording({"swapper": 1.0})
    assert asyncio.run(infer_with_fp32_twin(runner, "swapper", "swapper_fp32", INPUTS, ("out",), _read)) == (
        "swapper",
        False,
    )
    assert [model for model, _ in runner.sent] == ["swapper"]


def test_an_overflow_asks_the_twin_with_fp16_inputs_widened() -> None:
    runner = _Recording({"swapper": np.inf, "swapper_fp32": 1.0})
    result = asyncio.run(infer_with_fp32_twin(runner, "swapper", "swapper_fp32", INPUTS, ("out",), _read))
    assert result == ("swapper_fp32", True)
    assert runner.sent[1] == ("swapper_fp32", {"pixels": np.dtype(np.uint8), "latent": np.dtype(np.float32)})


def test_a_twin_that_overflows_too_fails_naming_both() -> None:
    runner = _Recording({"swapper": np.nan, "swapper_fp32": np.nan})
    with pytest.raises(
        FailedPrecondition, match="swapper_fp32 returned NaN or infinite values, as its FP16 build swapper"
    ):
        asyncio.run(infer_with_fp32_twin(runner, "swapper", "swapper_fp32", INPUTS, ("out",), _read))


def test_widening_touches_fp16_tensors_only() -> None:
    assert {name: tensor.dtype for name, tensor in widened(INPUTS).items()} == {
        "pixels": np.uint8,
        "latent": np.float32,
    }
    assert issubclass(NonFiniteOutputs, FailedPrecondition)

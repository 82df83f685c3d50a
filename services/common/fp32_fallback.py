"""One rule for a model whose FP16 answer overflows: ask its FP32 twin, and fail naming the model if that overflows too.

FP16 builds can overflow to NaN or Inf on inputs their FP32 originals handle; pasting or reading such an answer
silently is worse than failing. The readers of answers (the worker's crop unpacking, the detector's decoders)
raise NonFiniteOutputs where they find NaN or Inf; infer_with_fp32_twin catches it once, sends the same request
to the twin (services/common/face_model_catalog.fp32_twin_name names it) with FP16 inputs widened to FP32, as the
twin's config takes them, and a twin that overflows as well fails the request as FailedPrecondition: the model,
not the request, is at fault.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from services.common.errors import FailedPrecondition
from services.common.model_runner import ModelRunner

log = logging.getLogger(__name__)

ResultT = TypeVar("ResultT")
Answer = Mapping[str, np.ndarray]


class NonFiniteOutputs(FailedPrecondition):
    """An answer held NaN or Inf; infer_with_fp32_twin asks the model's FP32 twin instead."""


def non_finite_outputs(source: str = "the answer") -> NonFiniteOutputs:
    return NonFiniteOutputs(f"{source} holds NaN or infinite values")


def widened(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs as an FP32 twin takes them: FP16 tensors as FP32, the others as they are."""
    return {
        name: tensor.astype(np.float32) if tensor.dtype == np.float16 else tensor for name, tensor in inputs.items()
    }


async def infer_with_fp32_twin(
    runner: ModelRunner,
    model: str,
    twin: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    read: Callable[[str, Answer], Awaitable[ResultT]],
) -> tuple[ResultT, bool]:
    """(`read(model, answer)`, False), or, where it raised NonFiniteOutputs, (`read(twin, twin's answer)`, True)."""
    answer: Answer = await runner.infer(model, inputs, outputs)
    try:
        return await read(model, answer), False
    except NonFiniteOutputs:
        log.warning("model %s answered NaN or Inf; asking its FP32 twin %s", model, twin)
    answer = await runner.infer(twin, widened(inputs), outputs)
    try:
        return await read(twin, answer), True
    except NonFiniteOutputs:
        raise FailedPrecondition(
            f"model {twin} returned NaN or infinite values, as its FP16 build {model} did"
        ) from None

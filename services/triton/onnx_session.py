"""onnxruntime sessions and request batching shared by the Triton Python-backend model and LocalModels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Read when the model config carries no `intra_op_threads` parameter; 0 lets onnxruntime choose.
INTRA_OP_THREADS_ENV = "SWAPLINE_ORT_INTRA_OP_THREADS"
INTRA_OP_THREADS_PARAMETER = "intra_op_threads"

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

TensorMap = Mapping[str, np.ndarray]


def execution_providers(available: Sequence[str]) -> list[str]:
    """CUDA first where this onnxruntime build has it, CPU always last."""
    return [provider for provider in PREFERRED_PROVIDERS if provider in available or provider == "CPUExecutionProvider"]


def intra_op_threads(parameter: str | None, environ: Mapping[str, str] | None = None) -> int:
    source = os.environ if environ is None else environ
    raw = parameter if parameter not in (None, "") else source.get(INTRA_OP_THREADS_ENV, "0")
    try:
        threads = int(raw or "0")
    except ValueError:
        raise ValueError(f"intra-op thread count {raw!r} is not an integer") from None
    if threads < 0:
        raise ValueError(f"intra-op thread count {threads} is negative")
    return threads


def open_onnx_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Spinning pool threads pay off only on an idle machine; beside the other services on a
    # shared node they burn the cores the decoder and encoder need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(path), sess_options=options, providers=execution_providers(ort.get_available_providers())
    )


def batch_key(inputs: TensorMap) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """Requests can share one session call when every input agrees in everything but the batch size."""
    return tuple(sorted((name, tuple(array.shape[1:]), array.dtype.str) for name, array in inputs.items()))


def group_by_shape(requests: Sequence[TensorMap]) -> list[list[int]]:
    """Indices of `requests` grouped by batch_key, in first-seen order."""
    groups: dict[tuple[tuple[str, tuple[int, ...], str], ...], list[int]] = {}
    for index, inputs in enumerate(requests):
        groups.setdefault(batch_key(inputs), []).append(index)
    return list(groups.values())


def run_batched(
    session: ort.InferenceSession, requests: Sequence[TensorMap], output_names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """One session call for requests of one batch_key; the outputs come back split per request.

    Every returned array is C-contiguous: Triton's Python backend serialises an output by its buffer.
    """
    if len(requests) == 1:
        joined: Mapping[str, np.ndarray] = requests[0]
    else:
        joined = {name: np.concatenate([inputs[name] for inputs in requests]) for name in requests[0]}
    results = session.run(list(output_names), dict(joined))
    boundaries = np.cumsum([next(iter(inputs.values())).shape[0] for inputs in requests])[:-1]
    per_output = [np.split(result, boundaries) for result in results]
    return [
        {name: np.ascontiguousarray(parts[index]) for name, parts in zip(output_names, per_output, strict=True)}
        for index in range(len(requests))
    ]

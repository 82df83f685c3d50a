"""In-process onnxruntime over `triton_models/<m>/1/model.onnx`: the ModelRunner of tests and the bench.

It answers with the same tensors and dtypes as Triton does, so that a benchmark comparing both
measures only what the hops cost.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFailure
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from services.common.errors import InvalidArgument
from services.triton.model_config import output_dtypes, read_model_config, require_onnx
from services.triton.onnx_session import open_onnx_session, run_batched


class _LoadedModel:
    def __init__(self, session: ort.InferenceSession, dtypes: dict[str, np.dtype]) -> None:
        self.session = session
        self.output_dtypes = dtypes
        self.input_names = frozenset(tensor.name for tensor in session.get_inputs())


class LocalModels:
    def __init__(self, repository: Path, intra_op_threads: int = 0) -> None:
        self.repository = repository
        self.intra_op_threads = intra_op_threads
        self._models: dict[str, _LoadedModel] = {}
        self._lock = threading.Lock()

    def _model(self, model: str) -> _LoadedModel:
        with self._lock:
            loaded = self._models.get(model)
            if loaded is None:
                config = read_model_config(self.repository, model)
                session = open_onnx_session(require_onnx(self.repository, model), self.intra_op_threads)
                loaded = _LoadedModel(session, output_dtypes(config))
                self._models[model] = loaded
            return loaded

    def _run(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        loaded = self._model(model)
        if set(inputs) != loaded.input_names:
            raise InvalidArgument(
                f"model {model} takes inputs {sorted(loaded.input_names)}, was given {sorted(inputs)}"
            )
        unknown = [name for name in outputs if name not in loaded.output_dtypes]
        if unknown:
            raise InvalidArgument(f"model {model} has no outputs {unknown}; it has {sorted(loaded.output_dtypes)}")
        try:
            (result,) = run_batched(loaded.session, [inputs], outputs)
        except (OrtInvalidArgument, OrtFailure) as error:
            raise InvalidArgument(f"model {model}: {error}") from None
        return {name: result[name].astype(loaded.output_dtypes[name], copy=False) for name in outputs}

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        # onnxruntime releases the GIL while it computes, so a worker thread keeps the event loop free.
        return await asyncio.to_thread(self._run, model, inputs, outputs)

    def close(self) -> None:
        with self._lock:
            self._models.clear()

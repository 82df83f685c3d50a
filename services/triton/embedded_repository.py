"""Derives the embedded stack's model repository from the production configs in `triton_models/`.

Production serves the ONNX files with Triton's onnxruntime backend and TensorRT FP16 on GPUs. The
tritonserver in the nvidia-pytriton wheel has only the Python backend, so each model becomes a
Python-backend model (onnx_python_model.py) over the same model.onnx, keeping the name, tensors,
max_batch_size and dynamic batching (with no queue delay on CPU): clients see the same contract in both.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.triton.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_VERSION,
    read_model_config,
    repository_models,
    require_onnx,
)
from services.triton.onnx_session import INTRA_OP_THREADS_PARAMETER

PYTHON_MODEL_FILE = "model.py"
# Copied, never imported here: it imports triton_python_backend_utils, which exists only inside Triton.
PYTHON_MODEL_SOURCE = Path(__file__).with_name("onnx_python_model.py")


def embedded_config(
    production: model_config_pb2.ModelConfig, intra_op_threads: int = 0
) -> model_config_pb2.ModelConfig:
    """The Python-backend, CPU-instance twin of a production onnxruntime config."""
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(production)
    config.backend = "python"
    config.platform = ""
    config.default_model_filename = ""
    config.ClearField("optimization")
    del config.instance_group[:]
    # One CPU instance: the stub process runs onnxruntime, which picks the GPU itself when it has one.
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    if config.HasField("dynamic_batching"):
        # A CPU instance is busy for milliseconds a request, so requests queue behind it and batch
        # without waiting; the GPU's few hundred microseconds of waiting only spin here (tritonserver's
        # CPU a job: 0.81 s with the wait, 0.31 s without; docs/benchmarks.md).
        config.dynamic_batching.max_queue_delay_microseconds = 0
    if intra_op_threads > 0:
        config.parameters[INTRA_OP_THREADS_PARAMETER].string_value = str(intra_op_threads)
    return config


def write_embedded_model(
    production_repository: Path, model: str, out: Path, intra_op_threads: int = 0
) -> Path:
    """Writes `<out>/<model>/` (config, model.py, a link to the built model.onnx); returns that folder."""
    onnx_file = require_onnx(production_repository, model)
    config = embedded_config(read_model_config(production_repository, model), intra_op_threads)
    config.name = model
    model_dir = out / model
    version_dir = model_dir / MODEL_VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config))
    shutil.copyfile(PYTHON_MODEL_SOURCE, version_dir / PYTHON_MODEL_FILE)
    link = version_dir / MODEL_FILE
    link.unlink(missing_ok=True)
    link.symlink_to(onnx_file.resolve())
    return model_dir


def write_embedded_repository(
    production_repository: Path,
    out: Path,
    models: Sequence[str] | None = None,
    intra_op_threads: int = 0,
) -> list[str]:
    """Writes the embedded twin of every model in `models` (default: all configured); returns their names.

    A model without its model.onnx is an error, not a silent omission: a served repository that lacks
    a model fails the jobs that need it much later and less clearly.
    """
    chosen = list(models) if models is not None else repository_models(production_repository)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for model in chosen:
        write_embedded_model(production_repository, model, out, intra_op_threads)
    return chosen

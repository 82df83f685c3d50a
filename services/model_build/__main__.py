"""`python -m services.model_build`: writes every model.onnx of the Triton model repository, and beside
each the model.pt state dict that serves the same model from its torch definition (torch_models)."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.common.torch_runtime import save_state_dict
from services.model_build.mtcnn_cascade import write_mtcnn_cascade
from services.model_build.mtcnn_export import export_mtcnn, load_stage, triton_model_name
from services.model_build.mtcnn_nets import MTCNN_STAGES
from services.model_build.swapper_model import export_swapper
from services.model_build.torch_models import new_face_swapper
from services.triton.model_config import onnx_path, torch_weights_path

FACE_SWAPPER_MODEL = "face_swapper"
# Its FP32 twin (triton_models/face_swapper_fp32): the same module, built in FP32.
FACE_SWAPPER_FP32_MODEL = "face_swapper_fp32"


def write_torch_weights(weights_wheel: Path, repository: Path) -> list[Path]:
    """Writes `<repository>/<model>/1/model.pt` for every built-in model; returns the paths written."""
    modules = {triton_model_name(stage): load_stage(weights_wheel, stage) for stage in MTCNN_STAGES}
    modules[FACE_SWAPPER_MODEL] = new_face_swapper()
    modules[FACE_SWAPPER_FP32_MODEL] = new_face_swapper()
    return [save_state_dict(module, torch_weights_path(repository, name)) for name, module in modules.items()]


def build_repository(weights_wheel: Path, repository: Path) -> list[Path]:
    written = export_mtcnn(weights_wheel, repository)
    swapper_path = onnx_path(repository, FACE_SWAPPER_MODEL)
    export_swapper(swapper_path)
    twin_path = onnx_path(repository, FACE_SWAPPER_FP32_MODEL)
    export_swapper(twin_path, "fp32")
    return [
        *written,
        swapper_path,
        twin_path,
        *write_torch_weights(weights_wheel, repository),
        *write_mtcnn_cascade(weights_wheel, repository),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.model_build", description=__doc__)
    parser.add_argument("--weights-wheel", type=Path, required=True, help="facenet-pytorch wheel (MTCNN weights)")
    parser.add_argument("--repository", type=Path, required=True, help="Triton model repository to write into")
    arguments = parser.parse_args()
    for path in build_repository(arguments.weights_wheel, arguments.repository):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

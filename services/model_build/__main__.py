"""`python -m services.model_build`: writes every model.onnx of the Triton model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.model_build.mtcnn_export import export_mtcnn
from services.model_build.swapper_model import export_swapper
from services.triton.model_config import onnx_path

FACE_SWAPPER_MODEL = "face_swapper"


def build_repository(weights_wheel: Path, repository: Path) -> list[Path]:
    written = export_mtcnn(weights_wheel, repository)
    swapper_path = onnx_path(repository, FACE_SWAPPER_MODEL)
    export_swapper(swapper_path)
    return [*written, swapper_path]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.model_build", description=__doc__)
    parser.add_argument(
        "--weights-wheel", type=Path, required=True, help="facenet-pytorch wheel (MTCNN weights)"
    )
    parser.add_argument(
        "--repository", type=Path, required=True, help="Triton model repository to write into"
    )
    arguments = parser.parse_args()
    for path in build_repository(arguments.weights_wheel, arguments.repository):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

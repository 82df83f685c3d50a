"""What serving the built-in models through torch is configured by, without importing torch.

The embedded stack writes its model repository from these names in the process that starts
tritonserver, and must not pay torch's import (seconds, hundreds of MB) for it; the modules are
built inside Triton's stubs, or by torch_models in-process.
"""

from __future__ import annotations

from typing import Literal, get_args

from services.common.errors import InvalidArgument

# fp32 runs with TF32 off, the honest FP32 baseline; tf32 lets cuBLAS and cuDNN use TF32 Tensor
# Cores for FP32 tensors; fp16 runs the module and its inputs in half precision.
TorchPrecision = Literal["fp16", "fp32", "tf32"]
TORCH_PRECISIONS: tuple[TorchPrecision, ...] = get_args(TorchPrecision)

TORCH_WEIGHTS_FILE = "model.pt"
# The Triton model config parameters that tell torch_python_model.py what to build and how to run it.
FACTORY_PARAMETER = "torch_factory"
PRECISION_PARAMETER = "torch_precision"
_FACTORIES_MODULE = "services.model_build.torch_models"

# Model name -> "module:function" returning the model as an FP32 nn.Module (weights loaded apart).
BUILT_IN_FACTORIES: dict[str, str] = {
    "mtcnn_pnet": f"{_FACTORIES_MODULE}:new_mtcnn_pnet",
    "mtcnn_rnet": f"{_FACTORIES_MODULE}:new_mtcnn_rnet",
    "mtcnn_onet": f"{_FACTORIES_MODULE}:new_mtcnn_onet",
    "face_swapper": f"{_FACTORIES_MODULE}:new_face_swapper",
    "face_swapper_fp32": f"{_FACTORIES_MODULE}:new_face_swapper",
    # Production serves the cascade as TorchScript with Triton's PyTorch backend; it has no ONNX form.
    "mtcnn_cascade": "services.model_build.mtcnn_cascade:new_mtcnn_cascade",
}


# Models served in one precision whatever the stack's: a twin that exists to compute in FP32.
FIXED_PRECISIONS: dict[str, TorchPrecision] = {"face_swapper_fp32": "fp32"}


def parse_torch_precision(text: str) -> TorchPrecision:
    for precision in TORCH_PRECISIONS:
        if text == precision:
            return precision
    raise InvalidArgument(f"torch precision {text!r} is not one of {', '.join(TORCH_PRECISIONS)}")

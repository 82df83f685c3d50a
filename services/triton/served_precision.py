"""The precision the embedded Triton serves models in on a GPU: FP16, where Tensor Cores make it pay, or
FP32 from the start where the GPU catalogue says a visible GPU has no fast FP16.

The catalogue is the advisor's (`services/common/gpu_catalog.yaml`, or SWAPLINE_ADVISOR_CATALOG_PATH's
override): an entry with `fast_fp16: false` names such a GPU. A GPU the catalogue lacks is taken to have
fast FP16, as every GPU with Tensor Cores does, and the log says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.gpu_catalog import GpuCatalog, load_catalog
from services.common.gpu_telemetry import GpuUnavailable, NvmlReader
from services.common.torch_catalog import TorchPrecision

CATALOG_PATH_VARIABLE = "SWAPLINE_ADVISOR_CATALOG_PATH"


@dataclass(frozen=True)
class PrecisionDecision:
    precision: TorchPrecision
    reason: str


def precision_for_gpus(gpu_models: Sequence[str], catalog: GpuCatalog) -> PrecisionDecision:
    """FP32 if any of the GPUs (NVML model names) lacks fast FP16 by the catalogue, else FP16."""
    slow = sorted({model for model in gpu_models if (spec := catalog.find(model)) is not None and not spec.fast_fp16})
    if slow:
        return PrecisionDecision(
            "fp32", f"{', '.join(slow)}: no fast FP16 (GPU catalogue); serving FP32 from the start"
        )
    unknown = sorted({model for model in gpu_models if catalog.find(model) is None})
    if unknown:
        return PrecisionDecision("fp16", f"{', '.join(unknown)} not in the GPU catalogue; taken to have fast FP16")
    return PrecisionDecision("fp16", "every visible GPU has fast FP16 (GPU catalogue)")


def visible_gpu_models(reader: Callable[[], NvmlReader] = NvmlReader) -> list[str]:
    """NVML's model name of every visible GPU; none where NVML cannot be read."""
    nvml = reader()
    try:
        return [sample.model for sample in nvml.sample_all()]
    except GpuUnavailable:
        return []
    finally:
        nvml.close()


def served_precision() -> PrecisionDecision:
    """The decision for this machine's GPUs and the configured catalogue."""
    return precision_for_gpus(visible_gpu_models(), load_catalog(os.environ.get(CATALOG_PATH_VARIABLE, "")))

"""The TensorRT part of every production onnxruntime config, built-in (triton_models/) and imported (`swapline
models import`) alike: the accelerator, one optimisation profile covering the shapes the services send, and a
warm-up request at the profile's largest shape.

With an explicit profile for every dynamic input, onnxruntime's TensorRT provider builds its engine (or reads
it from the engine cache) while Triton loads the model, so the model is ready only once it can serve. Without
one the provider builds engines on the first requests, past the clients' deadlines, and builds again for every
new shape: P-Net's dynamic height and width asked for one per pyramid size. The warm-up then runs the largest
batch before the model is ready, so the memory it needs is taken at load and not in a job's first busy second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from tritonclient.grpc import model_config_pb2

from services.common.errors import InvalidArgument

TensorrtPrecision = Literal["fp16", "fp32"]
TENSORRT_PRECISIONS: tuple[TensorrtPrecision, ...] = get_args(TensorrtPrecision)
# Where TensorRT keeps its engines: in the chart, a link to the engine cache's directory of this pod's GPU model
# (services/triton/engine_cache.py), since an engine built on one GPU model is not valid on another.
TRT_ENGINE_CACHE = "/cache/trt/gpu"
TRT_WORKSPACE_BYTES = 1 << 30
# onnxruntime reads a profile as `name:1x3x256x256,other:1x512`: a name holding either separator has none.
_PROFILE_SEPARATORS = (",", ":")


@dataclass(frozen=True)
class SideRange:
    """The sizes a dynamic image side (a height or a width) takes; TensorRT picks its kernels for `typical`."""

    smallest: int
    typical: int
    largest: int

    def __post_init__(self) -> None:
        if not 1 <= self.smallest <= self.typical <= self.largest:
            raise InvalidArgument(f"side range {self.smallest}..{self.typical}..{self.largest} is not ordered")

    @classmethod
    def fixed(cls, side: int) -> SideRange:
        return cls(side, side, side)


@dataclass(frozen=True)
class ShapeProfile:
    """One input's whole shapes (the batch dimension first where Triton batches) at the profile's three points."""

    smallest: tuple[int, ...]
    typical: tuple[int, ...]
    largest: tuple[int, ...]


@dataclass(frozen=True)
class TensorrtPlan:
    """How a built-in model is accelerated: its precision and, for dynamic image sides, their range."""

    precision: TensorrtPrecision
    sides: SideRange | None = None


# P-Net's pyramid levels run from its 12-pixel window up to the whole of the worker's 640-pixel detection copy
# (its default detect_max_side), which a request's min_face_size of 12 asks for; 192 is that copy's first level
# at the detector's default min_face_size of 40. tests/triton/test_tensorrt_config.py holds these to the services.
PNET_SIDES = SideRange(12, 192, 640)
BUILT_IN_PLANS: dict[str, TensorrtPlan] = {
    "face_swapper": TensorrtPlan("fp16"),
    "face_swapper_fp32": TensorrtPlan("fp32"),
    "mtcnn_pnet": TensorrtPlan("fp16", PNET_SIDES),
    "mtcnn_rnet": TensorrtPlan("fp16"),
    "mtcnn_onet": TensorrtPlan("fp16"),
}


def typical_batch(config: model_config_pb2.ModelConfig) -> int:
    """The smallest preferred batch, where the dynamic batcher starts sending, else the largest batch."""
    preferred = config.dynamic_batching.preferred_batch_size
    return min(preferred) if preferred else config.max_batch_size


def _shape(config: model_config_pb2.ModelConfig, dims: list[int], side: int, batch: int) -> tuple[int, ...]:
    if config.max_batch_size > 0:
        return (batch, *(side if dim < 0 else dim for dim in dims))
    # A model Triton does not batch takes a request at a time: a leading open dimension is its batch of 1.
    leading = [1] if dims and dims[0] < 0 else dims[:1]
    return (*leading, *(side if dim < 0 else dim for dim in dims[1:]))


def input_profiles(config: model_config_pb2.ModelConfig, sides: SideRange | None) -> dict[str, ShapeProfile]:
    """Every input's shapes: batches from 1 to max_batch_size, open sides over `sides`."""
    profiles = {}
    for tensor in config.input:
        dims = list(tensor.dims)
        if sides is None and any(dim < 0 for dim in dims[0 if config.max_batch_size > 0 else 1 :]):
            raise InvalidArgument(f"model {config.name}: input {tensor.name!r} has open sides {dims} and no side range")
        # Without open sides the side is never used.
        chosen = sides if sides is not None else SideRange.fixed(1)
        profiles[tensor.name] = ShapeProfile(
            _shape(config, dims, chosen.smallest, 1),
            _shape(config, dims, chosen.typical, typical_batch(config)),
            _shape(config, dims, chosen.largest, config.max_batch_size),
        )
    return profiles


def _is_dynamic(config: model_config_pb2.ModelConfig, tensor: model_config_pb2.ModelInput) -> bool:
    return config.max_batch_size > 0 or any(dim < 0 for dim in tensor.dims)


def profile_option(profiles: dict[str, ShapeProfile], point: Literal["smallest", "typical", "largest"]) -> str:
    """`name:1x3x256x256,other:1x512`, the value of trt_profile_min/opt/max_shapes."""
    return ",".join(f"{name}:{'x'.join(map(str, getattr(profile, point)))}" for name, profile in profiles.items())


def with_tensorrt(
    config: model_config_pb2.ModelConfig, precision: TensorrtPrecision, sides: SideRange | None = None
) -> model_config_pb2.ModelConfig:
    """A copy of `config` served with TensorRT in `precision`: an explicit profile for every dynamic input (open
    sides over `sides`), the engine cache, and one warm-up request of zeros at the profile's largest shape. The
    copy's optimization and model_warmup are these alone."""
    if precision not in TENSORRT_PRECISIONS:
        raise InvalidArgument(f"precision {precision!r} is not one of {', '.join(TENSORRT_PRECISIONS)}")
    accelerated = model_config_pb2.ModelConfig()
    accelerated.CopyFrom(config)
    accelerated.ClearField("optimization")
    accelerated.ClearField("model_warmup")
    accelerator = accelerated.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters["precision_mode"] = precision.upper()
    accelerator.parameters["max_workspace_size_bytes"] = str(TRT_WORKSPACE_BYTES)
    accelerator.parameters["trt_engine_cache_enable"] = "1"
    accelerator.parameters["trt_engine_cache_path"] = TRT_ENGINE_CACHE
    profiles = input_profiles(config, sides)
    dynamic = {tensor.name: profiles[tensor.name] for tensor in config.input if _is_dynamic(config, tensor)}
    for name in dynamic:
        if any(separator in name for separator in _PROFILE_SEPARATORS):
            raise InvalidArgument(f"model {config.name}: TensorRT's profile option cannot name input {name!r}")
    if dynamic:
        accelerator.parameters["trt_profile_min_shapes"] = profile_option(dynamic, "smallest")
        accelerator.parameters["trt_profile_opt_shapes"] = profile_option(dynamic, "typical")
        accelerator.parameters["trt_profile_max_shapes"] = profile_option(dynamic, "largest")
    batched = config.max_batch_size > 0
    warmup = accelerated.model_warmup.add(
        name=f"{config.name}_largest", batch_size=config.max_batch_size if batched else 1, count=1
    )
    for tensor in config.input:
        largest = profiles[tensor.name].largest
        warmup.inputs[tensor.name].data_type = tensor.data_type
        warmup.inputs[tensor.name].dims.extend(largest[1:] if batched else largest)
        warmup.inputs[tensor.name].zero_data = True
    return accelerated


def built_in_with_tensorrt(config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    """A built-in model's config with its plan's TensorRT (what triton_models/<model>/config.pbtxt holds)."""
    plan = BUILT_IN_PLANS.get(config.name)
    if plan is None:
        raise InvalidArgument(f"model {config.name!r} is not a built-in model served by TensorRT")
    return with_tensorrt(config, plan.precision, plan.sides)

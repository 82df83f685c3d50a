"""A STAND-IN for inswapper_128 with random weights: its contract and its cost, never a face swapper.

Until real swapper weights come (the model-sets issue), FP16 against FP32 is measured on a network
with inswapper_128's tensors and about its size and arithmetic. Its weights are random (seeded), so
its output is not a swap of anything; every name, label and file it appears in says "stand-in".

What is public about inswapper_128.onnx, and copied here in shape only:
- inputs "target" (n, 3, 128, 128) float32, the aligned crop as RGB 0..1, and "source" (n, 512)
  float32, the ArcFace identity latent after inswapper's emap projection (unit length); output
  "output" (n, 3, 128, 128) float32 in 0..1;
- an encoder of four convolutions (7x7 to 128 channels, then 256, then two stride-2 steps to 1024
  channels at 32x32), six residual blocks at 1024 channels whose two 3x3 convolutions are each
  followed by adaptive instance normalisation driven by the 512-d latent, and a decoder that
  upsamples twice (bilinear) through 512, 256 and 128 channels to a 7x7 convolution and tanh;
- about 138.3M parameters (the FP32 file is about 554 MB) and 174.7 G multiply-adds a face.

The widths are the ordinary ones above; nothing is padded or rounded to suit Tensor Cores, so FP16
gets no help that FP32 does not. `width` scales every channel count, for tiny test instances.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import InvalidArgument
from services.common.media_paths import temporary_path
from services.model_build.swapper_model import SWAPPER_PRECISIONS, SwapperPrecision

STANDIN_LABEL = "inswapper_128 stand-in (random weights, not a face swapper)"
CROP_SIDE = 128
LATENT_SIZE = 512
INPUT_NAMES = ("target", "source")
OUTPUT_NAMES = ("output",)
# The published size of inswapper_128, which the full-width stand-in matches to within a few percent.
INSWAPPER_PARAMETERS = 138_300_000
# And its published cost: 174.7 G multiply-adds a face.
INSWAPPER_MULTIPLY_ADDS = 174_700_000_000
ENCODER_WIDTHS = (128, 256, 512, 1024)
STYLE_BLOCKS = 6
LEAKY_SLOPE = 0.2
NORM_EPSILON = 1e-5
# The latent is unit length, so style weights of this spread give scales and shifts of about +-0.5:
# the identity visibly changes the output, as it must for FP16's error on it to be measured.
STYLE_WEIGHT_STD = 0.5
# The last convolution's weights have this spread times 1/sqrt(fan-in): the decoder's features are of
# order 2, so tanh's inputs are of order 1 and few pixels sit on its flat ends, where an FP16 error
# would vanish from the parity measure.
OUTPUT_GAIN = 0.5
DEFAULT_SEED = 0
# A width for tests and CPU runs: the same layers at 1/32 of the channels (about 0.5M parameters).
TINY_WIDTH = 1 / 32
ONNX_OPSET = 17


def adaptive_instance_norm(features: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Instance-normalised features scaled by (1 + scale) and shifted, both taken from `style` (n, 2C)."""
    scale, shift = style[:, :, None, None].chunk(2, dim=1)
    return F.instance_norm(features, eps=NORM_EPSILON) * (1 + scale) + shift


class StyleBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.style1 = nn.Linear(LATENT_SIZE, 2 * channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.style2 = nn.Linear(LATENT_SIZE, 2 * channels)

    def forward(self, features: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(adaptive_instance_norm(self.conv1(features), self.style1(latent)))
        return features + adaptive_instance_norm(self.conv2(hidden), self.style2(latent))


def scaled_widths(width: float) -> tuple[int, ...]:
    if not 0 < width <= 1:
        raise InvalidArgument(f"stand-in width multiplier {width} is not in (0, 1]")
    return tuple(max(1, round(channels * width)) for channels in ENCODER_WIDTHS)


class InswapperStandIn(nn.Module):
    """inswapper_128's contract and cost with random weights (see the module's docstring)."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        w128, w256, w512, w1024 = scaled_widths(width)
        self.encode1 = nn.Conv2d(3, w128, 7, padding=3, padding_mode="reflect")
        self.encode2 = nn.Conv2d(w128, w256, 3, padding=1)
        self.encode3 = nn.Conv2d(w256, w512, 3, stride=2, padding=1)
        self.encode4 = nn.Conv2d(w512, w1024, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(StyleBlock(w1024) for _ in range(STYLE_BLOCKS))
        self.decode1 = nn.Conv2d(w1024, w512, 3, padding=1)
        self.decode2 = nn.Conv2d(w512, w256, 3, padding=1)
        self.decode3 = nn.Conv2d(w256, w128, 3, padding=1)
        self.decode4 = nn.Conv2d(w128, 3, 7, padding=3, padding_mode="reflect")

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        features = target
        for conv in (self.encode1, self.encode2, self.encode3, self.encode4):
            features = F.leaky_relu(conv(features), LEAKY_SLOPE)
        for block in self.blocks:
            features = block(features, source)
        features = F.interpolate(features, scale_factor=2.0, mode="bilinear", align_corners=False)
        features = F.leaky_relu(self.decode1(features), LEAKY_SLOPE)
        features = F.interpolate(features, scale_factor=2.0, mode="bilinear", align_corners=False)
        features = F.leaky_relu(self.decode2(features), LEAKY_SLOPE)
        features = F.leaky_relu(self.decode3(features), LEAKY_SLOPE)
        return (torch.tanh(self.decode4(features)) + 1) / 2


def randomise_weights(module: InswapperStandIn, seed: int) -> None:
    """He-normal convolutions (variance-preserving through leaky ReLU), N(0, STYLE_WEIGHT_STD) style
    layers, an output layer of OUTPUT_GAIN, zero biases: values stay of order one, as in a trained network."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if layer is module.decode4:
                fan_in = layer.weight[0].numel()
                nn.init.normal_(layer.weight, std=OUTPUT_GAIN / fan_in**0.5, generator=generator)
            elif isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu", generator=generator)
            elif isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=STYLE_WEIGHT_STD, generator=generator)
            else:
                continue
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def new_inswapper_standin(width: float = 1.0, seed: int = DEFAULT_SEED) -> InswapperStandIn:
    """The FP32 stand-in on the CPU in eval mode, its random weights fixed by `seed`."""
    # Built on the meta device and then given storage, so the weights are drawn once, not twice.
    with torch.device("meta"):
        module = InswapperStandIn(width)
    module = module.to_empty(device="cpu")
    randomise_weights(module, seed)
    return module.eval()


def new_tiny_inswapper_standin() -> InswapperStandIn:
    """The stand-in at TINY_WIDTH: a factory ("module:function") for tests and CPU runs of the sweep."""
    return new_inswapper_standin(TINY_WIDTH)


def standin_parameter_count(width: float = 1.0) -> int:
    """The stand-in's parameter count, computed without allocating its weights."""
    with torch.device("meta"):
        module = InswapperStandIn(width)
    return sum(parameter.numel() for parameter in module.parameters())


def standin_multiply_adds(width: float = 1.0) -> int:
    """Multiply-adds of the convolutions and style layers for one face (the rest is a rounding error),
    from a forward pass on the meta device: shapes only, nothing allocated or computed."""
    counted: list[int] = []

    def count(weights: int, _layer: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        counted.append(weights * output.shape[2] * output.shape[3] if output.ndim == 4 else weights)

    with torch.device("meta"):
        module = InswapperStandIn(width)
        target = torch.empty((1, 3, CROP_SIDE, CROP_SIDE))
        source = torch.empty((1, LATENT_SIZE))
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            layer.register_forward_hook(partial(count, layer.weight.numel()))
    module(target, source)
    return sum(counted)


def example_inputs(batch: int, seed: int = DEFAULT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (target, source): crops uniform in 0..1 and unit-length latents, as inswapper receives."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand((batch, 3, CROP_SIDE, CROP_SIDE), generator=generator)
    latent = torch.randn((batch, LATENT_SIZE), generator=generator)
    return target, latent / latent.norm(dim=1, keepdim=True)


class Float32Contract(nn.Module):
    """Computes in FP16 behind float32 inputs and output: the FP16 twin keeps inswapper's contract."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.module(target.half(), source.half()).float()


def export_inswapper_standin(
    path: Path, precision: SwapperPrecision = "fp32", width: float = 1.0, seed: int = DEFAULT_SEED
) -> Path:
    """Writes the stand-in as ONNX (opset 17, dynamic batch), float32 tensors, computing in `precision`.

    At full width the FP32 file is about 550 MB and the FP16 one about half that.
    """
    if precision not in SWAPPER_PRECISIONS:
        raise InvalidArgument(f"stand-in precision {precision!r} is not one of {', '.join(SWAPPER_PRECISIONS)}")
    module: nn.Module = new_inswapper_standin(width, seed)
    if precision == "fp16":
        module = Float32Contract(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_path(path)
    batch_axis = {0: "batch"}
    try:
        # The TorchScript exporter, as for the other models (mtcnn_export); torch flags it deprecated. Two
        # warnings of its own say nothing here: instance normalisation always uses the input's statistics
        # (it keeps no running ones), and the style's chunk() is sliced at run time, not constant-folded.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", "ONNX export mode is set to TrainingMode.EVAL", UserWarning)
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
            torch.onnx.export(
                module,
                example_inputs(2),
                str(partial),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: batch_axis for name in (*INPUT_NAMES, *OUTPUT_NAMES)},
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path

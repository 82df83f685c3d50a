"""Small torch modules that tests serve by factory name ("tests.triton.torch_stand_ins:<function>"),
in-process and inside Triton's stubs, where the repository root is on PYTHONPATH."""

from __future__ import annotations

import torch
from torch import nn

# A production-style config for the stand-ins: FP16 in, one FP16 and one FP32 output.
STAND_IN_CONFIG = """
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP16 dims: [ 3, 4, 4 ] } ]
output [
  { name: "doubled" data_type: TYPE_FP16 dims: [ 3, 4, 4 ] },
  { name: "total" data_type: TYPE_FP32 dims: [ 1 ] }
]
"""


class Doubler(nn.Module):
    """Two outputs per item: the input doubled, and its sum; counts its forward passes and the dtypes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls = 0
        self.seen_dtypes: list[torch.dtype] = []

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        self.seen_dtypes.append(image.dtype)
        doubled = image * self.scale
        return doubled, doubled.flatten(1).sum(dim=1, keepdim=True)


class OneOutputShort(nn.Module):
    """Declared with two outputs, returns one."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image


class PassesThrough(nn.Module):
    """Returns its input itself as the first output."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image, image.flatten(1).sum(dim=1, keepdim=True)


class DropsAnItem(nn.Module):
    """Returns one item fewer than it was given."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image[1:], image[1:].flatten(1).sum(dim=1, keepdim=True)


def new_doubler() -> nn.Module:
    return Doubler()


def new_one_output_short() -> nn.Module:
    return OneOutputShort()


def new_drops_an_item() -> nn.Module:
    return DropsAnItem()


def new_not_a_module() -> object:
    return "a string"

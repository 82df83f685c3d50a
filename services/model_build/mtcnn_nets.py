"""The three MTCNN stages as torch modules whose parameter names match facenet-pytorch's state dicts.

The weights were converted from the original Caffe MTCNN, which stored feature maps as (W, H);
the R-Net and O-Net dense layers therefore expect their input flattened in (W, H, C) order, which
is why those stages transpose before flattening. Every stage takes raw RGB pixels (0..255, NCHW)
and normalises them itself, so that clients of the exported models never repeat that step.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

MtcnnStage = Literal["pnet", "rnet", "onet"]
MTCNN_STAGES: tuple[MtcnnStage, ...] = ("pnet", "rnet", "onet")

# The square input side R-Net and O-Net were trained on; P-Net is fully convolutional.
STAGE_INPUT_SIDE: dict[MtcnnStage, int | None] = {"pnet": None, "rnet": 24, "onet": 48}

STAGE_OUTPUTS: dict[MtcnnStage, tuple[str, ...]] = {
    "pnet": ("probability", "regression"),
    "rnet": ("probability", "regression"),
    "onet": ("probability", "regression", "landmarks"),
}

PIXEL_CENTRE = 127.5
PIXEL_SCALE = 0.0078125


def normalise_pixels(image: torch.Tensor) -> torch.Tensor:
    return (image - PIXEL_CENTRE) * PIXEL_SCALE


def flatten_width_major(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, W*H*C), the order the Caffe-converted dense weights read."""
    return features.permute(0, 3, 2, 1).reshape(features.shape[0], -1)


class ProposalNet(nn.Module):
    """P-Net: scans an image pyramid level; outputs per 12x12 window (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.pool1(self.prelu1(self.conv1(normalise_pixels(image))))
        features = self.prelu3(self.conv3(self.prelu2(self.conv2(features))))
        probability = torch.softmax(self.conv4_1(features), dim=1)
        return probability, self.conv4_2(features)


class RefineNet(nn.Module):
    """R-Net: rescores and refines P-Net's candidate boxes from 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.pool1(self.prelu1(self.conv1(normalise_pixels(image))))
        features = self.pool2(self.prelu2(self.conv2(features)))
        features = self.prelu3(self.conv3(features))
        embedding = self.prelu4(self.dense4(flatten_width_major(features)))
        probability = torch.softmax(self.dense5_1(embedding), dim=1)
        return probability, self.dense5_2(embedding)


class OutputNet(nn.Module):
    """O-Net: final score, box refinement and five landmarks (x1..x5, y1..y5 relative to the box)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.pool1(self.prelu1(self.conv1(normalise_pixels(image))))
        features = self.pool2(self.prelu2(self.conv2(features)))
        features = self.pool3(self.prelu3(self.conv3(features)))
        features = self.prelu4(self.conv4(features))
        embedding = self.prelu5(self.dense5(flatten_width_major(features)))
        probability = torch.softmax(self.dense6_1(embedding), dim=1)
        return probability, self.dense6_2(embedding), self.dense6_3(embedding)


def new_stage(stage: MtcnnStage) -> nn.Module:
    if stage == "pnet":
        return ProposalNet()
    if stage == "rnet":
        return RefineNet()
    return OutputNet()

"""CIFAR-style ResNets (He et al. 2016): ResNet-8/20/32/56 (16-32-64 channels) and ResNet-18 (3x3 stem, no max-pool)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, Classifier


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Classifier):
    def __init__(self, blocks: Sequence[int], widths: Sequence[int], in_channels: int, num_classes: int):
        super().__init__(widths[-1], num_classes)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride if j == 0 else 1))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))

    def stage_features(self, x: torch.Tensor):
        """The output of every residual stage (for multi-stage heads such as SSKT's transfer module)."""
        outs, h = [], self.stem(x)
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        return outs

    @property
    def stage_channels(self):
        return [stage[-1].bn2.num_features for stage in self.stages]


def _cifar_resnet(depth: int):
    if (depth - 2) % 6:
        raise ValueError("CIFAR ResNet depth must be 6n+2")
    n = (depth - 2) // 6

    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 16):
        return ResNet([n, n, n], [width, 2 * width, 4 * width], in_channels, num_classes)

    build.__name__ = f"resnet{depth}"
    return build


for _depth in (8, 20, 32, 56):
    MODELS.register(f"resnet{_depth}")(_cifar_resnet(_depth))


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 64):
    return ResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], in_channels, num_classes)

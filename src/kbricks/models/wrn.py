"""Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation blocks, depth 6n+4, widths 16k-32k-64k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, Classifier


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + shortcut


class WideResNet(Classifier):
    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float = 0.0):
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        super().__init__(widths[-1], num_classes)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1, dropout))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.blocks(self.stem(x)))


@MODELS.register("wrn")
def wrn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, depth: int = 28, widen: int = 2, dropout: float = 0.0):
    return WideResNet(depth, widen, in_channels, num_classes, dropout)


def _wrn28(k: int):
    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dropout: float = 0.0):
        return WideResNet(28, k, in_channels, num_classes, dropout)

    return build


for _k in (2, 4, 10):
    MODELS.register(f"wrn28_{_k}")(_wrn28(_k))

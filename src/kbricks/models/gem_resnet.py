"""The reduced ResNet-18 of GEM (Lopez-Paz & Ranzato 2017) as used by SupSup on SplitCIFAR100 ("GEMResNet18").

Four stages of two basic blocks with ``nf, 2nf, 4nf, 8nf`` channels (nf = 20), a 3x3 stride-1 stem, no max-pool,
bias-free convolutions, non-affine BatchNorm, global average pooling and a bias-free output layer. With nf = 20
and a 5-way output (one SplitCIFAR100 task) it has 1,090,940 weights in 21 conv/linear layers, all of them masked
by SupSup (the paper's "1.09 M"), and 1,500 BatchNorm channels (3,000 running statistics per task once
supermasked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, Classifier


class GemBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, affine=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, affine=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class GemResNet(Classifier):
    def __init__(self, in_channels: int, num_classes: int, nf: int = 20, blocks=(2, 2, 2, 2)):
        super().__init__(8 * nf, num_classes)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf, affine=False), nn.ReLU())
        stages, cin = [], nf
        for i, n in enumerate(blocks):
            width = nf * 2 ** i
            stages.append(nn.Sequential(*[GemBlock(cin if j == 0 else width, width, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # = avg_pool2d(4) on 32x32 inputs
        if num_classes > 0:
            self.head = nn.Linear(8 * nf, num_classes, bias=False)  # SupSup masks the output layer too: no bias

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


@MODELS.register("gem_resnet18", tags=("masked",))
def gem_resnet18(num_classes: int = 5, in_channels: int = 3, image_size: int = 32, nf: int = 20) -> GemResNet:
    """SupSup's GEMResNet18 (nf=20: 1.09 M weights with a 5-way output); bias-free, non-affine BatchNorm."""
    return GemResNet(in_channels, num_classes, nf)

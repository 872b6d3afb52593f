"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and first stages, width multiplier."""

from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, Classifier

# (expansion t, channels c, repeats n, stride s); strides 1,1,2,2,1,2,1 suit 32x32 inputs
CIFAR_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _round8(v: float) -> int:
    return max(8, int(v + 4) // 8 * 8)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(Classifier):
    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 1.0, last_channels: int = 1280):
        last = _round8(last_channels * max(1.0, width_mult))
        super().__init__(last, num_classes)
        cin = _round8(32 * width_mult)
        layers = [nn.Sequential(nn.Conv2d(in_channels, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True))]
        for t, c, n, s in CIFAR_SETTINGS:
            cout = _round8(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width_mult: float = 1.0, last_channels: int = 1280):
    return MobileNetV2(in_channels, num_classes, width_mult, last_channels)

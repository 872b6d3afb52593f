"""MLP (images or feature vectors) and a small CNN sized for 8x8 digits up to 64x64 dSprites (any aspect ratio)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import MODELS, Classifier, ImageSize, input_numel, spatial_size


class MLP(Classifier):
    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0):
        super().__init__(hidden[-1] if hidden else in_features, num_classes)
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(nn.Flatten(), *layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@MODELS.register("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1, image_size: ImageSize = 28, hidden: Sequence[int] = (256, 256), dropout: float = 0.0):
    return MLP(input_numel(in_channels, image_size), num_classes, tuple(hidden), dropout)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(Classifier):
    """Blocks of two 3x3 convs; 2x2 max-pool between blocks while the map is >= 8 pixels; global average pool."""

    def __init__(self, in_channels: int, num_classes: int, image_size: ImageSize, widths: Sequence[int] = (32, 64, 128)):
        super().__init__(widths[-1], num_classes)
        layers, cin, size = [], in_channels, min(spatial_size(image_size))
        for i, w in enumerate(widths):
            layers += [conv_bn_relu(cin, w), conv_bn_relu(w, w)]
            if i < len(widths) - 1 and size >= 8:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            cin = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: ImageSize = 28, widths: Sequence[int] = (32, 64, 128)):
    if image_size is None:
        raise ConfigError("small_cnn needs images [N, C, H, W]; the data are feature vectors (use an MLP such as mlp)")
    return SmallCNN(in_channels, num_classes, image_size, tuple(widths))

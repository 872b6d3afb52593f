"""Every built-in model is a ``Classifier``: ``features(x) -> [B, D]`` then a linear ``head``.

Methods read ``features`` and attach their own heads (auxiliary heads, task heads, projections).

Model factories get the data's shape as ``in_channels`` and ``image_size``: H for square images, (H, W) for
others, ``None`` for feature vectors [N, D] (then ``in_channels`` is D). :func:`input_numel` and
:func:`spatial_size` read every form.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn

from ..registry import Registry

ImageSize = Union[int, Sequence[int], None]


def spatial_size(image_size: ImageSize) -> Tuple[int, int]:
    """(H, W) of an ``image_size`` argument; (1, 1) for feature vectors."""
    if image_size is None:
        return 1, 1
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def input_numel(in_channels: int, image_size: ImageSize) -> int:
    """Values per sample: C * H * W for images, D for feature vectors."""
    h, w = spatial_size(image_size)
    return int(in_channels) * h * w

MODELS = Registry("model", "kbricks.models")


class Classifier(nn.Module):
    # feature_dim (int) is set in __init__; no class-level annotation: TorchScript cannot resolve a postponed one

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

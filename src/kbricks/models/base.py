"""Every built-in model is a ``Classifier``: ``features(x) -> [B, D]`` then a linear ``head``.

Methods read ``features`` and attach their own heads (auxiliary heads, task heads, projections).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import Registry

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

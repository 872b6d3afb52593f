"""Heads that methods put on a backbone's features."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .base import Classifier


class MultiHeadClassifier(nn.Module):
    """A backbone's features feeding one linear head per task (e.g. one per dSprites latent)."""

    def __init__(self, backbone: Classifier, head_sizes: List[int]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(backbone.feature_dim, n) for n in head_sizes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        z = self.features(x)
        return [h(z) for h in self.heads]

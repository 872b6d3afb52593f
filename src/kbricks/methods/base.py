"""Method API: a thin ``nn.Module`` whose ``training_step`` returns a dict of named losses.

``loss`` in that dict is what is optimised; the other entries are logged. ``predict`` gives eval logits
(one tensor over the dataset's classes, or a list with one tensor per task for multi-head models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..data import ArrayDataset, Task
from ..registry import Registry

METHODS = Registry("method")


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    latents: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    raw: Optional[torch.Tensor] = None  # the un-augmented [0, 1] images, for methods that draw extra views


@dataclass
class MethodContext:
    """What a method needs to build itself: the run config, training data and tasks."""

    cfg: "object"  # RunConfig (not imported to avoid a cycle)
    train: ArrayDataset
    tasks: List[Task]
    device: torch.device
    transform: Optional["object"] = None  # the run's BatchAugment (normalisation statistics, extra views)


Prediction = Union[torch.Tensor, List[torch.Tensor]]


class Method(nn.Module):
    Config = MethodParams

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        # DDP hooks forward(), so training goes through it
        return self.training_step(batch)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def export_module(self) -> nn.Module:
        """The network to ship after training (auxiliary parts dropped)."""
        return self

    def export_extra(self, run_dir, card: dict) -> None:
        """Write method-specific artefacts next to model.safetensors (e.g. KF bricks). Default: nothing."""

    loadable_as_classifier = True  # model.json + model.safetensors rebuild one plain network

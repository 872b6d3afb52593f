"""Method API: a thin ``nn.Module`` whose ``training_step`` returns a dict of named losses.

``loss`` in that dict is what is optimised; the other entries are logged. ``predict`` gives eval logits
(one tensor over the dataset's classes, or a list with one tensor per task for multi-head models).
A method may contribute hooks to the run (``hooks()``), e.g. KF writes its bricks when training ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..config import RunConfig
from ..core.hooks import Hook
from ..data import ArrayDataset, BatchAugment, Task, TaskData
from ..registry import Registry

METHODS = Registry("method", "kbricks.methods")


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
    """What a method needs to build itself: the run config, training data and tasks (plus, for continual runs,
    the scenario's task sequence)."""

    cfg: RunConfig
    train: ArrayDataset
    tasks: List[Task]
    device: torch.device
    transform: Optional[BatchAugment] = None  # the run's BatchAugment (normalisation statistics, extra views)
    scenario: Optional[List[TaskData]] = None


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

    def teacher_probe(self) -> Optional[Dict]:
        """The teacher's accuracy on a labelled probe of the training data, as measured at load (``{accuracy, samples,
        chance, alternatives}``), for the run summary; None for a method without a teacher."""
        return getattr(getattr(self, "teacher", None), "probe", None) or None

    def hooks(self) -> List[Hook]:
        """Extra hooks this method adds to its run (artefacts, reports). Default: none."""
        return []

    def report(self, exp, run_dir, baseline=None) -> Optional[Dict]:
        """A method's own evaluation report for ``kbricks evaluate`` (``exp`` holds the loaded run). ``None``: the
        engine's accuracy evaluation is the report."""
        return None


def list_methods(pattern: str = "*", tag: Optional[str] = None) -> List[str]:
    return METHODS.names(pattern, tag)

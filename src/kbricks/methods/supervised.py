"""Plain supervised training (teachers, scratch baselines): cross-entropy with optional label smoothing.

With latent tasks (e.g. dSprites shape/scale/...) the model gets one linear head per task on shared features
and the loss is the mean cross-entropy over heads.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..models import MultiHeadClassifier, create_model
from .base import METHODS, Batch, Method, MethodContext, MethodParams


def build_network(ctx: MethodContext, num_outputs: int | None = None) -> nn.Module:
    """The configured model, sized to the data; multi-head when the tasks are latent factors."""
    mc = ctx.cfg.model
    latent = [t for t in ctx.tasks if t.kind == "latent"]
    n_out = 0 if latent else (num_outputs or ctx.train.num_classes)
    net = create_model(
        mc.name, num_classes=n_out, in_channels=ctx.train.in_channels, image_size=ctx.train.image_size, **mc.layers(), **mc.kwargs
    )
    if latent:
        return MultiHeadClassifier(net, [t.num_classes for t in ctx.tasks])
    return net


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@METHODS.register("supervised", tags=("train",))
class Supervised(Method):
    class Config(MethodParams):
        label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    def __init__(self, params: "Supervised.Config", ctx: MethodContext):
        super().__init__()
        self.params = params
        self.tasks = ctx.tasks
        self.net = build_network(ctx)
        self.multi_head = isinstance(self.net, MultiHeadClassifier)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        out = self.net(batch.x)
        if self.multi_head:
            losses = {
                f"ce_{t.name}": cross_entropy_loss(o, t.local_labels(batch.y, batch.latents), self.params.label_smoothing)
                for t, o in zip(self.tasks, out)
            }
            losses["loss"] = torch.stack(list(losses.values())).mean()
            return losses
        ce = cross_entropy_loss(out, batch.y, self.params.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.net(x)

    def export_module(self) -> nn.Module:
        return self.net

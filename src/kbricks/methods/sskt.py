"""SSKT (self-supervised knowledge transfer via loosely supervised auxiliary tasks, WACV 2022).

The target network gets one auxiliary head per frozen source network. Each head learns the source's
temperature-softened predictions on the same augmented target batch, computed online under no_grad:

    loss = CE(target(x), y) + alpha * sum_m T^2 * softCE(aux_m(x) / T, softmax(source_m(x) / T))

softCE reduces by batch mean (sum over classes), the clean version of the official code's KLDivLoss('mean').
Sources stay in eval mode. Heads are training-only: ``export_module`` returns the bare target network.
A source may have any label space: only its number of outputs matters.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..models.spec import NetworkSpec
from ._teacher import load_network
from .base import METHODS, Batch, Method, MethodContext, MethodParams
from .supervised import build_network


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_b( -sum_c softmax(target/T)_c * log_softmax(logits/T)_c )."""
    t = temperature
    p = F.softmax(target_logits / t, dim=1)
    return -(p * F.log_softmax(logits / t, dim=1)).sum(1).mean() * t * t


def sskt_loss(logits, labels, aux_logits: List[torch.Tensor], source_logits: List[torch.Tensor], alpha: float, temperature: float) -> Dict[str, torch.Tensor]:
    ce = F.cross_entropy(logits, labels)
    aux = [soft_cross_entropy(a, s, temperature) for a, s in zip(aux_logits, source_logits)]
    aux_sum = torch.stack(aux).sum() if aux else ce.new_zeros(())
    out = {"loss": ce + alpha * aux_sum, "ce": ce.detach(), "aux": aux_sum.detach()}
    out.update({f"aux_{i}": a.detach() for i, a in enumerate(aux)})
    return out


class TransferModule(nn.Module):
    """Per-stage bottleneck branches (1x1 -> 3x3 stride 2 -> 1x1, BN + ReLU), pooled, averaged, then linear."""

    def __init__(self, stage_channels: List[int], width: int, num_outputs: int):
        super().__init__()
        mid = max(1, width // 2)

        def branch(c: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, 3, 2, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )

        self.branches = nn.ModuleList(branch(c) for c in stage_channels)
        self.fc = nn.Linear(width, num_outputs)

    def forward(self, stages: List[torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.stack([b(s) for b, s in zip(self.branches, stages)]).mean(0))


@METHODS.register("sskt", tags=("distillation",))
class SSKT(Method):
    class Config(MethodParams):
        sources: List[NetworkSpec] = Field(..., min_length=1, description="trained source classifiers, any label space: kbricks runs, "
                                           "TorchScript files or import paths, each with its input convention (docs/byo.md)")
        alpha: float = Field(0.1, ge=0)
        temperature: float = Field(3.0, gt=0)
        transfer_module: bool = Field(False, description="multi-stage heads (needs a model with stage_features, e.g. resnet*)")

    def __init__(self, params: "SSKT.Config", ctx: MethodContext):
        super().__init__()
        self.params = params
        self.net = build_network(ctx)
        self.sources = nn.ModuleList(load_network(s, ctx, f"method.sources[{i}]") for i, s in enumerate(params.sources))
        sizes = []
        for spec, src in zip(params.sources, self.sources):
            if src.task_names or not isinstance(src.num_outputs, int):
                raise ConfigError(f"source {spec.describe()} is multi-head; SSKT sources must be single-head classifiers")
            sizes.append(src.num_outputs)
        if params.transfer_module:
            if not hasattr(self.net, "stage_features"):
                raise ConfigError(f"method.transfer_module needs a model with stage_features (resnet*), not {ctx.cfg.model.name!r}")
            ch = self.net.stage_channels
            self.heads = nn.ModuleList(TransferModule(ch, ch[-1], n) for n in sizes)
        else:
            self.heads = nn.ModuleList(nn.Linear(self.net.feature_dim, n) for n in sizes)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        p = self.params
        if p.transfer_module:
            stages = self.net.stage_features(batch.x)
            z = self.net.pool(stages[-1])
            aux = [h(stages) for h in self.heads]
        else:
            z = self.net.features(batch.x)
            aux = [h(z) for h in self.heads]
        with torch.no_grad():
            targets = [src(batch.x) for src in self.sources]  # online, same augmented batch
        return sskt_loss(self.net.head(z), batch.y, aux, targets, p.alpha, p.temperature)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.net(x)

    def export_module(self) -> nn.Module:
        return self.net  # auxiliary heads are dropped

"""Deep Mutual Learning (Zhang et al., CVPR 2018): K peers trained together, each also matching the others.

loss_k = CE(p_k, y) + mean_{j != k} KL(p_j || p_k)   (peers' predictions detached, T = 1)
All peers update simultaneously from one summed loss (a common simplification of the paper's alternating
updates). Peer 0 is evaluated and exported.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import METHODS, Batch, Method, MethodContext, MethodParams
from .kd import kd_loss
from .supervised import build_network


def dml_loss(logits: List[torch.Tensor], labels: torch.Tensor, temperature: float = 1.0) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    total = logits[0].new_zeros(())
    for k, lk in enumerate(logits):
        ce = F.cross_entropy(lk, labels)
        mimic = torch.stack([kd_loss(lk, lj.detach(), temperature) for j, lj in enumerate(logits) if j != k]).mean()
        out[f"ce_{k}"], out[f"kl_{k}"] = ce.detach(), mimic.detach()
        total = total + ce + mimic
    out["loss"] = total
    return out


@METHODS.register("dml", tags=("distillation",))
class DeepMutualLearning(Method):
    class Config(MethodParams):
        peers: int = Field(2, ge=2)
        temperature: float = Field(1.0, gt=0)

    def __init__(self, params: "DeepMutualLearning.Config", ctx: MethodContext):
        super().__init__()
        self.params = params
        self.peers = nn.ModuleList(build_network(ctx) for _ in range(params.peers))

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        return dml_loss([p(batch.x) for p in self.peers], batch.y, self.params.temperature)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.peers[0](x)

    def export_module(self) -> nn.Module:
        return self.peers[0]

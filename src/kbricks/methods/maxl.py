"""MAXL, Meta AuXiliary Learning (Liu, Davison, Johns, NeurIPS 2019).

A label-generation network g proposes, for each image, a soft auxiliary label over the psi sub-classes of its
true class (a masked softmax over a hierarchy of sum(psi) auxiliary classes). The multi-task network f (primary
head + auxiliary head on shared features) trains on primary CE + auxiliary CE to g's labels (focal loss by
default, as in the reference code). g is trained by a second-order meta step: one look-ahead SGD step of f on
its multi-task loss (create_graph), then the primary loss of the looked-ahead f, plus an entropy regulariser
that spreads the batch's usage of sub-classes, is backpropagated into g only.
Every training step does the f update and then the g meta update on the same batch.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from ..core import dist
from ..errors import ConfigError
from .base import METHODS, Batch, Method, MethodContext, MethodParams
from .supervised import build_network


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """-sum_c target_c (1 - p_c)^gamma log p_c, averaged over the batch (gamma = 0: soft cross-entropy)."""
    logp = F.log_softmax(logits, dim=1)
    return -(target * (1 - logp.exp()).pow(gamma) * logp).sum(1).mean()


def hierarchy_mask(num_classes: int, psi: int) -> torch.Tensor:
    """[C, C*psi]: row k is 1 on primary class k's block of psi auxiliary classes."""
    return torch.kron(torch.eye(num_classes), torch.ones(1, psi))


def masked_softmax(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax restricted to the true class's block of auxiliary classes."""
    m = mask[labels]
    z = logits.masked_fill(m == 0, float("-inf"))
    return F.softmax(z, dim=1)


def negative_entropy_of_mean(p: torch.Tensor) -> torch.Tensor:
    q = p.mean(0)
    return (q * torch.log(q + 1e-12)).sum()


class MultiTaskNet(nn.Module):
    def __init__(self, backbone: nn.Module, aux_classes: int):
        super().__init__()
        self.backbone = backbone
        self.aux_head = nn.Linear(backbone.feature_dim, aux_classes)

    def forward(self, x: torch.Tensor):
        z = self.backbone.features(x)
        return self.backbone.head(z), self.aux_head(z)


@METHODS.register("maxl", tags=("auxiliary",))
class MAXL(Method):
    class Config(MethodParams):
        psi: int = Field(5, ge=1, description="auxiliary sub-classes per primary class")
        focal_gamma: float = Field(2.0, ge=0)
        entropy_weight: float = Field(0.2, ge=0)
        generator_lr: float = Field(1e-3, gt=0)
        generator_weight_decay: float = Field(5e-4, ge=0)
        inner_lr: float = Field(0.01, gt=0, description="learning rate of the look-ahead step")

    def __init__(self, params: "MAXL.Config", ctx: MethodContext):
        super().__init__()
        if dist.world_size() > 1:
            raise ConfigError("MAXL's second-order meta step is single-process only (DDP does not sync autograd.grad)")
        self.params = params
        c = ctx.train.num_classes
        self.net = MultiTaskNet(build_network(ctx), c * params.psi)
        generator = build_network(ctx, num_outputs=c * params.psi)
        self.generator = generator
        self.register_buffer("mask", hierarchy_mask(c, params.psi))
        self.gen_optimizer = torch.optim.SGD(generator.parameters(), lr=params.generator_lr, weight_decay=params.generator_weight_decay)

    def trainable_parameters(self):
        return self.net.parameters()  # the generator has its own optimiser, stepped in the meta update

    def multitask_loss(self, params_or_none, x, y, aux_target):
        if params_or_none is None:
            pri, aux = self.net(x)
        else:
            pri, aux = functional_call(self.net, params_or_none, (x,))
        primary = focal_loss(pri, F.one_hot(y, pri.shape[1]).float(), self.params.focal_gamma)
        auxiliary = focal_loss(aux, aux_target, self.params.focal_gamma)
        return primary, auxiliary

    def meta_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Second-order update of the label generator through a one-step look-ahead of the multi-task net."""
        p = self.params
        gen_labels = masked_softmax(self.generator(x), y, self.mask)
        params = dict(self.net.named_parameters())
        buffers = dict(self.net.named_buffers())
        primary, auxiliary = self.multitask_loss({**params, **buffers}, x, y, gen_labels)
        grads = torch.autograd.grad(primary + auxiliary, list(params.values()), create_graph=True)
        ahead = {k: v - p.inner_lr * g for (k, v), g in zip(params.items(), grads)}
        ahead_primary, _ = self.multitask_loss({**ahead, **buffers}, x, y, gen_labels.detach())
        meta = ahead_primary + p.entropy_weight * negative_entropy_of_mean(gen_labels)
        self.gen_optimizer.zero_grad(set_to_none=True)
        gen_grads = torch.autograd.grad(meta, list(self.generator.parameters()))
        for param, g in zip(self.generator.parameters(), gen_grads):
            param.grad = g
        self.gen_optimizer.step()
        return meta.detach()

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        x, y = batch.x, batch.y
        if self.training:
            meta = self.meta_step(x, y)
        else:
            meta = x.new_zeros(())
        with torch.no_grad():
            gen_labels = masked_softmax(self.generator(x), y, self.mask)
        primary, auxiliary = self.multitask_loss(None, x, y, gen_labels)
        return {"loss": primary + auxiliary, "primary": primary.detach(), "auxiliary": auxiliary.detach(), "meta": meta}

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.net(x)[0]

    def export_module(self) -> nn.Module:
        return self.net.backbone  # the primary classifier; aux head and generator are dropped

"""MAXL, Meta AuXiliary Learning (Liu, Davison, Johns, NeurIPS 2019).

A label-generation network g proposes, for each image, a soft auxiliary label over the psi sub-classes of its
true class (a masked softmax over a hierarchy of sum(psi) auxiliary classes). The multi-task network f (primary
head + auxiliary head on shared features) trains on primary + auxiliary loss to g's labels (focal loss by default,
as in the reference code). g is trained by a second-order meta step: one look-ahead SGD step of f on its
multi-task loss (create_graph), then the primary loss of the looked-ahead f, plus an entropy regulariser that
spreads the batch's usage of sub-classes, is backpropagated into g only.

Order, as in the paper's Algorithm 1 and the reference code: every epoch first updates f over the whole training
set (the engine's loop, g's labels held fixed), then updates g over the whole training set (one meta step per
batch). The look-ahead step uses f's current learning rate, and g's learning rate follows f's schedule (both are
halved together in the reference code). The g pass of epoch e runs when epoch e+1 starts (``MetaPass``); the g
pass after the last epoch could not change f and is skipped.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from ..core import dist
from ..core.hooks import Hook
from ..core.seeding import derive_seed, generator
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
        self.register_buffer("last_meta_loss", torch.zeros(()))

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

    def meta_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, lr_factor: float = 1.0) -> torch.Tensor:
        """Second-order update of the label generator through a one-step look-ahead of the multi-task net with
        learning rate ``lr`` (f's current one); g's own learning rate is ``generator_lr * lr_factor``."""
        p = self.params
        for group in self.gen_optimizer.param_groups:
            group["lr"] = p.generator_lr * lr_factor
        gen_labels = masked_softmax(self.generator(x), y, self.mask)
        params = dict(self.net.named_parameters())
        buffers = dict(self.net.named_buffers())
        primary, auxiliary = self.multitask_loss({**params, **buffers}, x, y, gen_labels)
        grads = torch.autograd.grad(primary + auxiliary, list(params.values()), create_graph=True)
        ahead = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
        ahead_primary, _ = self.multitask_loss({**ahead, **buffers}, x, y, gen_labels.detach())
        meta = ahead_primary + p.entropy_weight * negative_entropy_of_mean(gen_labels)
        self.gen_optimizer.zero_grad(set_to_none=True)
        gen_grads = torch.autograd.grad(meta, list(self.generator.parameters()))
        for param, g in zip(self.generator.parameters(), gen_grads):
            param.grad = g
        self.gen_optimizer.step()
        return meta.detach()

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """The f update: primary + auxiliary loss to g's current labels (g is updated by ``MetaPass``)."""
        x, y = batch.x, batch.y
        with torch.no_grad():
            gen_labels = masked_softmax(self.generator(x), y, self.mask)
        primary, auxiliary = self.multitask_loss(None, x, y, gen_labels)
        return {"loss": primary + auxiliary, "primary": primary.detach(), "auxiliary": auxiliary.detach(),
                "meta": self.last_meta_loss.clone()}

    def hooks(self) -> List[Hook]:
        return [MetaPass(self)]

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.net(x)[0]

    def export_module(self) -> nn.Module:
        return self.net.backbone  # the primary classifier; aux head and generator are dropped


class MetaPass(Hook):
    """g's pass over the training set after each epoch of f updates (run when the next epoch starts, so a resumed
    run replays it exactly: its batch order and augmentation are functions of (seed, epoch))."""

    def __init__(self, method: MAXL):
        self.method = method

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch == 0:
            return
        m, loop, exp = self.method, trainer.loop, trainer.exp
        data, bs = exp.data.train, loop.batch_size
        sched = loop.scheduler
        lr = loop.lr  # f's current learning rate
        factor = lr / sched.base_lrs[0] if sched.base_lrs[0] > 0 else 1.0
        order = torch.randperm(len(data), generator=generator(derive_seed(exp.cfg.seed, epoch - 1, 7)))
        aug = generator(derive_seed(exp.cfg.seed, epoch - 1, 8))
        was = m.training
        m.train()
        total = 0.0
        for step in range(loop.steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            x = exp.transform(data.x[idx].to(exp.device), train=True, generator=aug)
            total += m.meta_step(x, data.y[idx].to(exp.device), lr, factor).item()
        m.train(was)
        m.last_meta_loss.fill_(total / max(1, loop.steps_per_epoch))

"""Elastic weight consolidation (Kirkpatrick et al. 2017), online form (Schwarz et al. 2018, gamma = 1): after each
task the diagonal of the empirical Fisher (squared per-sample gradients of the cross-entropy at the true labels, on
``fisher_samples`` training images of the task, BatchNorm in eval mode) is added to a running sum, and the weights
are anchored at their values after that task. While learning later tasks the loss adds

    ewc_lambda / 2 * sum_i F_i (w_i - w*_i)^2

Stored: the summed Fisher and the anchor, two fp32 copies of the trainable weights whatever the number of tasks
(``fixed_bytes``), plus the per-task head rows when ``head: per_task`` / ``union``."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call, grad, vmap

from ..methods.base import METHODS
from .plugins import ContinualPlugin, tensor_bytes, weights_of
from .strategy import ContinualStrategy, DenseParams


def empirical_fisher(strategy: ContinualStrategy, t: int, samples: int, chunk: int = 64) -> Dict[str, torch.Tensor]:
    """Mean squared per-sample gradient of task ``t``'s cross-entropy (its own head) over its first ``samples``
    training images, for every trainable weight of ``strategy.net``."""
    net, data = strategy.net, strategy.scenario[t].train
    n = min(samples, len(data))
    params = {k: v.detach() for k, v in weights_of(net).items()}
    buffers = dict(net.named_buffers())
    task = torch.tensor([t], device=strategy.device)

    def sample_loss(p, x, y):
        out = functional_call(net, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(strategy.head_logits(out, task), strategy.head_targets(y.unsqueeze(0), task))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    was_training = net.training
    net.eval()
    for i in range(0, n, chunk):
        x = strategy.transform(data.x[i:i + chunk].to(strategy.device), train=False)
        g = per_sample(params, x, data.y[i:i + chunk].to(strategy.device))
        for k in fisher:
            fisher[k] += g[k].pow(2).sum(0)
    net.train(was_training)
    return {k: v / n for k, v in fisher.items()}


class EWCPlugin(ContinualPlugin):
    name = "ewc"

    def __init__(self, strength: float, samples: int):
        super().__init__()
        self.strength, self.samples = strength, samples
        self.fisher: Dict[str, torch.Tensor] = {}
        self.anchor: Dict[str, torch.Tensor] = {}

    def after_task(self, strategy, t: int) -> None:
        new = empirical_fisher(strategy, t, self.samples)
        self.fisher = {k: self.fisher[k] + v if k in self.fisher else v for k, v in new.items()}
        self.anchor = {k: v.detach().clone() for k, v in weights_of(strategy.net).items()}

    def loss(self, strategy, x, out, tasks) -> Optional[torch.Tensor]:
        if not self.fisher:
            return None
        terms: List[torch.Tensor] = [(self.fisher[k] * (w - self.anchor[k]).pow(2)).sum() for k, w in weights_of(strategy.net).items()]
        return 0.5 * self.strength * torch.stack(terms).sum()

    def fixed_bytes(self, strategy) -> float:
        weights = list(weights_of(strategy.net).values())
        return float(2 * tensor_bytes(*weights))  # the summed Fisher and the anchor (before the first task: not yet there)

    def describe(self):
        return {"ewc_lambda": self.strength, "fisher_samples": self.samples, "fisher": "empirical, summed over tasks (online EWC, gamma 1)"}

    def get_extra_state(self):
        return {**{f"fisher.{k}": v for k, v in self.fisher.items()}, **{f"anchor.{k}": v for k, v in self.anchor.items()}}

    def set_extra_state(self, state) -> None:
        self.fisher = {k[len("fisher."):]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}


@METHODS.register("ewc", tags=("continual",))
class EWC(ContinualStrategy):
    class Config(DenseParams):
        ewc_lambda: float = Field(100.0, ge=0, description="weight of the quadratic penalty (lambda in Kirkpatrick et al.)")
        fisher_samples: int = Field(1000, ge=1, description="training images of each task the diagonal Fisher is estimated on")

    def make_plugins(self):
        return [EWCPlugin(self.params.ewc_lambda, self.params.fisher_samples)]

"""Task inference when the task id is missing (SupSup's GN setting), for any strategy whose tasks are coefficients
over stored masks (SupSup: task t = mask t; ImpressLearn: task t = sum_i alpha_ti M_i).

Superpose every candidate task with weights beta (uniform), take one forward/backward of the mean output entropy
with respect to each layer's superposed mask G_l, and read off dH/dbeta_t = sum_l <G_l, C_tl> as one dot product
per stored mask (then the coefficients): no loop of forwards. One-shot picks argmin; binary search repeatedly
keeps the better half (for tasks that are hard to tell apart).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..models.masked import FixedMasks
from .strategy import ContinualStrategy


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def superposition_gradient(strategy: ContinualStrategy, x: torch.Tensor, active: Sequence[int]) -> torch.Tensor:
    """dH/dbeta for every learned task at beta uniform over ``active`` (the others at 0)."""
    net = strategy.net
    coeffs = strategy.task_coefficients()  # [T, L, K] or None (identity: task t = mask t)
    n_tasks = net.num_stored() if coeffs is None else coeffs.shape[0]
    beta = torch.zeros(n_tasks, device=x.device)
    beta[list(active)] = 1.0 / len(active)
    layers = net.masked_layers()
    masks: List[torch.Tensor] = []
    for i, layer in enumerate(layers):
        w = beta if coeffs is None else beta @ coeffs[:, i, :]  # weight of each stored mask
        masks.append((w @ layer.bank.as_float()).view(layer.bank.shape).requires_grad_(True))
    with torch.enable_grad(), net.using(FixedMasks(masks)):
        h = mean_entropy(net(x))
        grads = torch.autograd.grad(h, masks)
    per_mask = [layer.bank.as_float() @ g.reshape(-1) for layer, g in zip(layers, grads)]  # [K] per layer
    if coeffs is None:
        return torch.stack(per_mask).sum(0)
    return sum(coeffs[:, i, :] @ d for i, d in enumerate(per_mask))


@torch.no_grad()
def infer_task(strategy: ContinualStrategy, x: torch.Tensor, method: str = "one_shot") -> int:
    net = strategy.net
    if net.has_task_batchnorm():
        raise ValueError("task inference needs a network without per-task BatchNorm statistics")
    was = strategy.training
    strategy.eval()
    n = net.num_stored() if strategy.task_coefficients() is None else strategy.task_coefficients().shape[0]
    active = list(range(n))
    if method == "one_shot":
        choice = int(superposition_gradient(strategy, x, active).argmin())
    elif method == "binary":
        while len(active) > 1:
            g = superposition_gradient(strategy, x, active)
            active = sorted(active, key=lambda i: g[i].item())[: max(1, len(active) // 2)]
        choice = active[0]
    else:
        raise ValueError(f"unknown task-inference method {method!r}; use one_shot or binary")
    strategy.train(was)
    return choice

"""Task inference when the task id is missing (SupSup's GN scenario).

Superpose every candidate task's combined mask with coefficients beta (uniform), take one forward/backward of
the mean output entropy, and pick the task whose coefficient most decreases the entropy (one-shot), or
repeatedly keep the better half (binary search, for tasks that are hard to tell apart).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..models.masked import SupermaskNet


def candidate_masks(net: SupermaskNet, task_alphas: Sequence[List[torch.Tensor]]) -> List[torch.Tensor]:
    """Per layer, a [T, *shape] stack of each candidate task's combined mask."""
    per_layer = []
    for i, layer in enumerate(net.masked_layers()):
        per_layer.append(torch.stack([layer.combine(alphas[i]) for alphas in task_alphas]))
    return per_layer


def entropy_gradient(net: SupermaskNet, x: torch.Tensor, candidates: List[torch.Tensor], active: Sequence[int]) -> torch.Tensor:
    """d H / d beta at beta uniform over the ``active`` candidates (the others fixed at 0)."""
    beta = torch.zeros(candidates[0].shape[0])
    beta[list(active)] = 1.0 / len(active)
    beta.requires_grad_(True)
    net.use_alpha([beta] * len(candidates), candidates)
    logits = net(x)
    p = F.softmax(logits, dim=1)
    h = -(p * F.log_softmax(logits, dim=1)).sum(1).mean()
    (grad,) = torch.autograd.grad(h, beta)
    net.release()
    return grad


def infer_task(net: SupermaskNet, x: torch.Tensor, candidates: List[torch.Tensor], method: str = "one_shot") -> int:
    was = net.training
    net.eval()
    active = list(range(candidates[0].shape[0]))
    if method == "one_shot":
        g = entropy_gradient(net, x, candidates, active)
        choice = int(g.argmin())
    elif method == "binary":
        while len(active) > 1:
            g = entropy_gradient(net, x, candidates, active)
            order = sorted(active, key=lambda i: g[i].item())
            active = order[: max(1, len(active) // 2)]
        choice = active[0]
    else:
        raise ValueError(f"unknown task-inference method {method!r}; use one_shot or binary")
    net.train(was)
    return choice

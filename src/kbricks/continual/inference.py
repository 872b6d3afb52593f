"""Inference when the task id is missing, for any supermask strategy whose tasks are coefficients over stored masks
(SupSup: task t = mask t; ImpressLearn: task t = sum_i alpha_ti M_i).

SupSup's rule (``one_shot`` / ``binary``): superpose every candidate task with weights beta (uniform), take one
forward/backward of an objective with respect to each layer's superposed mask G_l, and read off
dObj/dbeta_t = sum_l <G_l, C_tl> as one dot product per stored mask (then the coefficients): no loop of forwards.
One-shot picks the argmin; binary search repeatedly keeps the better half. Objectives: ``entropy`` (mean output
entropy) or ``g`` (SupSup's G: logsumexp of the logits with gradient through the superfluous outputs only; needs a
network with ``method.outputs`` larger than the classes).

ImpressLearn's own way (``refit``): since a task *is* a coefficient vector, fit fresh coefficients on the
unlabeled batch by minimising the output entropy (plus the training regulariser), from 1/k (``uniform``) or from
the stored alpha the one-shot rule picks (``nearest``), and classify with them; the stored alpha nearest to the
re-fitted one names the task.

With per-task BatchNorm statistics the task is unknown, so BatchNorm uses the batch's own statistics (as SupSup's
code does by calling ``model.train()`` during inference).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..models.masked import Combination, FixedMasks
from .strategy import ContinualStrategy, masked_net


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def g_objective(logits: torch.Tensor, real: int) -> torch.Tensor:
    """SupSup's G: logsumexp over every output, the gradient flowing through the superfluous ones only."""
    if logits.shape[1] <= real:
        raise ValueError(f"the G objective needs superfluous outputs: the network has {logits.shape[1]} outputs for "
                         f"{real} classes (set method.outputs)")
    keep = torch.arange(logits.shape[1], device=logits.device) < real
    mixed = torch.where(keep, logits.detach(), logits)
    return mixed.logsumexp(1).mean()


def objective_value(strategy: ContinualStrategy, logits: torch.Tensor, objective: str) -> torch.Tensor:
    if objective == "entropy":
        return mean_entropy(logits)
    if objective == "g":
        return g_objective(logits, max(strategy.task_classes))
    raise ValueError(f"unknown task-inference objective {objective!r}; use entropy or g")


def _statistics(strategy: ContinualStrategy):
    net = masked_net(strategy)
    return net.batch_statistics() if net.has_task_batchnorm() else nullcontext()


def num_learned(strategy: ContinualStrategy) -> int:
    coeffs = strategy.task_coefficients()
    return masked_net(strategy).num_stored() if coeffs is None else coeffs.shape[0]


def superposition_gradient(strategy: ContinualStrategy, x: torch.Tensor, active: Sequence[int], objective: str = "entropy") -> torch.Tensor:
    """dObj/dbeta for every learned task at beta uniform over ``active`` (the others at 0)."""
    net = masked_net(strategy)
    coeffs = strategy.task_coefficients()  # [T, L, K] or None (identity: task t = mask t)
    n_tasks = net.num_stored() if coeffs is None else coeffs.shape[0]
    layers = net.masked_layers()
    masks: List[torch.Tensor] = []
    if coeffs is None and len(active) == n_tasks:  # SupSup, every task: the bank's counts, kept as masks are stored
        masks = [(layer.bank.total() / n_tasks).detach().requires_grad_(True) for layer in layers]
    else:
        beta = torch.zeros(n_tasks, device=x.device)
        beta[list(active)] = 1.0 / len(active)
        for i, layer in enumerate(layers):
            w = beta if coeffs is None else beta @ coeffs[:, i, :]  # weight of each stored mask
            masks.append(layer.bank.combine(w).detach().requires_grad_(True))
    with torch.enable_grad(), net.using(FixedMasks(masks)), _statistics(strategy):
        value = objective_value(strategy, net(x), objective)
        grads = torch.autograd.grad(value, masks)
    # d/dmask of W*mask is G*W: the layer's weight is folded into the gradient by autograd already
    per_mask = [layer.bank.dots(g) for layer, g in zip(layers, grads)]  # [K] per layer
    if coeffs is None:
        return torch.stack(per_mask).sum(0)
    return sum(coeffs[:, i, :] @ d for i, d in enumerate(per_mask))


@torch.no_grad()
def infer_task(strategy: ContinualStrategy, x: torch.Tensor, method: str = "one_shot", objective: str = "entropy") -> int:
    """The task SupSup's rule picks for the unlabeled batch ``x``."""
    was = strategy.training
    strategy.eval()
    active = list(range(num_learned(strategy)))
    if method == "one_shot":
        choice = int(superposition_gradient(strategy, x, active, objective).argmin())
    elif method == "binary":
        while len(active) > 1:
            g = superposition_gradient(strategy, x, active, objective)
            active = sorted(active, key=lambda i: g[i].item())[: max(1, len(active) // 2)]
        choice = active[0]
    else:
        raise ValueError(f"unknown task-inference method {method!r}; use one_shot or binary")
    strategy.train(was)
    return choice


def refit_coefficients(strategy: ContinualStrategy, x: torch.Tensor, init: str = "uniform", steps: int = 25,
                       lr: float = 0.01) -> Tuple[torch.Tensor, int]:
    """ImpressLearn without a task id: coefficients fit to the unlabeled batch ``x`` by entropy minimisation (plus
    the training regulariser on ||alpha_l||_1). Returns (logits of ``x`` with them, the task whose stored alpha is
    nearest)."""
    coeffs = strategy.task_coefficients()
    if coeffs is None:
        raise ValueError(f"{type(strategy).__name__} stores one mask per task: there are no coefficients to re-fit")
    net = masked_net(strategy)
    was = strategy.training
    strategy.eval()
    if init == "uniform":
        start = torch.full_like(coeffs[0], 1.0 / coeffs.shape[2])
    elif init == "nearest":
        start = coeffs[infer_task(strategy, x, "one_shot")]
    else:
        raise ValueError(f"unknown refit start {init!r}; use uniform or nearest")
    alpha = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=lr)
    reg = float(getattr(strategy.params, "reg", 0.0))
    with torch.enable_grad(), _statistics(strategy):
        for _ in range(steps):
            with net.using(Combination(alpha)):
                loss = mean_entropy(net(x)) + reg * ((alpha.abs().sum(1) - 1.0) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad(), _statistics(strategy), net.using(Combination(alpha.detach())):
        logits = net(x)
    nearest = int(((coeffs - alpha.detach()) ** 2).flatten(1).sum(1).argmin())
    strategy.train(was)
    return logits, nearest

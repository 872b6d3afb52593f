"""Accuracy counting over a dataset (sharded across DDP ranks), kept separate from where it is logged.

Works on anything with a ``predict(x)`` method returning one logit tensor over the dataset's classes or a list
with one tensor per task, and on task objects with ``classes`` / ``local_labels`` / ``member_mask`` (data.Task).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from . import dist


def correct_counts(pred, y: torch.Tensor, latents, tasks: Sequence, num_classes: int) -> torch.Tensor:
    """Per-batch counts as one tensor: [overall_correct, overall_n, (task_correct, task_n) * T].

    For a single head over all classes, a class task's accuracy is task-aware: argmax over that task's classes
    among that task's samples. For multi-head output (a list), task t's head is compared with its own labels.
    """
    out: List[float] = []
    if isinstance(pred, (list, tuple)):
        per = []
        for t, logits in zip(tasks, pred):
            target = t.local_labels(y, latents)
            per += [(logits.argmax(1) == target).sum().item(), float(target.numel())]
        # overall = mean over tasks, stored as sums so the reduction stays exact
        out = [sum(per[0::2]), sum(per[1::2])] + per
    else:
        out = [(pred.argmax(1) == y).sum().item(), float(y.numel())]
        for t in tasks:
            if t.classes is None:
                out += [0.0, 0.0]
                continue
            member = t.member_mask(y)
            cls = torch.tensor(t.classes, dtype=torch.long, device=pred.device)
            local = pred[member][:, cls].argmax(1)
            out += [(local == t.local_labels(y[member])).sum().item(), float(member.sum().item())]
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def evaluate(method, ds, tasks: Sequence, transform, device, batch_size: int = 512) -> Dict[str, float]:
    """Accuracy over ``ds`` (sharded across ranks, counts all-reduced) plus per-task accuracy."""
    was_training = method.training
    method.eval()
    r, w = dist.rank(), dist.world_size()
    totals = torch.zeros(2 + 2 * len(tasks), dtype=torch.float64)
    idx_all = torch.arange(r, len(ds), w)
    for start in range(0, len(idx_all), batch_size):
        idx = idx_all[start:start + batch_size]
        x = transform(ds.x[idx].to(device), train=False)
        y = ds.y[idx].to(device)
        lat = ds.latents[idx].to(device) if ds.latents is not None else None
        totals += correct_counts(method.predict(x), y, lat, tasks, ds.num_classes)
    totals = dist.all_reduce_sum(totals)
    method.train(was_training)
    metrics = {"acc": (totals[0] / totals[1].clamp_min(1)).item()}
    if len(tasks) > 1 or tasks[0].kind == "latent":
        for i, t in enumerate(tasks):
            c, n = totals[2 + 2 * i], totals[3 + 2 * i]
            if n > 0:
                metrics[f"acc_{t.name}"] = (c / n).item()
    return metrics


@torch.no_grad()
def argmax_accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: Any, y: Any, batch_size: int = 512) -> float:
    """Fraction of ``x`` whose argmax of ``predict(batch)`` equals ``y`` (any network or function returning one logit
    tensor); a network is scored in eval mode and left in the mode it was in."""
    x, y = torch.as_tensor(x).float(), torch.as_tensor(y).long()
    was = predict.training if isinstance(predict, nn.Module) else None
    if was is not None:
        predict.eval()
    right = 0
    try:
        for i in range(0, len(x), batch_size):
            out = predict(x[i:i + batch_size])
            if isinstance(out, (list, tuple)):
                raise ConfigError("this network has one output per task; score each task's output separately")
            right += int((out.argmax(1).cpu() == y[i:i + batch_size].cpu()).sum())
    finally:
        if was is not None:
            predict.train(was)
    return right / max(1, len(x))

"""Plugins: the parts of a continual strategy that a regulariser, a replay buffer or a post-task step adds, composed
by a strategy's ``make_plugins()`` list (``ewc.py``, ``lwf.py``, ``replay.py`` are one plugin and a few lines each).

A plugin is an ``nn.Module`` without parameters: what it keeps (a Fisher diagonal, a teacher's weights, a buffer of
samples) is its ``get_extra_state`` dict of tensors, so it is in the strategy's checkpoint and a resumed run continues
with it. Every hook has a do-nothing default:

* ``before_task(strategy, t)`` / ``after_task(strategy, t)``: e.g. compute the Fisher, snapshot the teacher, add to
  the buffer once task t is learned;
* ``replay_batch(strategy, n)``: extra samples ``(x, y, task)`` (transformed like a training batch) that the strategy
  mixes into the batch, each trained through its own task's head;
* ``loss(strategy, x, out, tasks)``: a loss term on the network's output ``out`` for the (mixed) input ``x``;
* ``bytes_per_task`` / ``fixed_bytes``: what it stores, counted in the run's storage columns.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn


class ContinualPlugin(nn.Module):
    name = "plugin"

    def before_task(self, strategy, t: int) -> None:
        pass

    def after_task(self, strategy, t: int) -> None:
        pass

    def replay_batch(self, strategy, n: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return None

    def loss(self, strategy, x: torch.Tensor, out: torch.Tensor, tasks: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def bytes_per_task(self, strategy) -> Tuple[float, str]:
        """(bytes, what) this plugin stores for every task learned (it grows with the task count)."""
        return 0.0, ""

    def fixed_bytes(self, strategy) -> float:
        """Bytes this plugin stores whatever the task count (e.g. one summed Fisher, one teacher)."""
        return 0.0

    def describe(self) -> Dict[str, object]:
        """The plugin's settings, for the run's results."""
        return {}

    # what the plugin keeps: a dict of tensors in the checkpoint (empty until it has something)
    def get_extra_state(self) -> Dict[str, torch.Tensor]:
        return {}

    def set_extra_state(self, state: Dict[str, torch.Tensor]) -> None:
        pass


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weights_of(net: nn.Module) -> Dict[str, torch.Tensor]:
    """The trainable weights of ``net`` by name (the ones a regulariser anchors)."""
    return {n: p for n, p in net.named_parameters() if p.requires_grad}

"""Experience replay (ER; Chaudhry et al. 2019, "On tiny episodic memories"): a buffer of raw training samples of
the finished tasks; every training step adds ``replay_batch`` samples drawn uniformly from it to the current batch,
each trained through its own task's head (``head: per_task``), with its class in the union head (``union``), or
with its label in the shared head (``shared``).

The buffer keeps ``buffer_per_task`` samples of every finished task (drawn at random, class-balanced when the task's
classes allow it), or, with ``buffer_total``, a fixed number of samples shared equally by the finished tasks (older
tasks give up samples as new ones come). A task's samples are stored in round-robin class order, so the prefix an
older task keeps when the buffer shrinks is class-balanced too. Samples are stored as the dataset holds them (float32 images in [0, 1]) with
an int64 label and task id; their bytes are what ``bytes_per_task`` / ``fixed_bytes`` count."""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field, model_validator

from ..errors import ConfigError
from ..methods.base import METHODS
from .plugins import ContinualPlugin, tensor_bytes
from .strategy import ContinualStrategy, DenseParams


def balanced_sample(y: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``min(n, len(y))`` indices into ``y`` drawn at random within each class, in round-robin class order (one of
    each class, then the next of each, ...): every prefix is as equal as possible across the classes, so a buffer
    that later keeps only the first ``keep`` samples of a task stays balanced."""
    n = min(n, len(y))
    per_class = [(y == c).nonzero().flatten() for c in y.unique()]
    per_class = [ix[torch.randperm(len(ix), generator=generator)] for ix in per_class]
    taken, i = [], 0
    while len(taken) < n:  # balanced while every class has samples left; then the larger classes fill the rest
        for ix in per_class:
            if i < len(ix) and len(taken) < n:
                taken.append(ix[i])
        i += 1
    return torch.stack(taken) if taken else torch.zeros(0, dtype=torch.long)


class ReplayPlugin(ContinualPlugin):
    name = "replay"

    def __init__(self, per_task: Optional[int], total: Optional[int], batch: Optional[int]):
        super().__init__()
        self.per_task, self.total, self.batch = per_task, total, batch
        self.x: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None
        self.task: Optional[torch.Tensor] = None

    def after_task(self, strategy, t: int) -> None:
        data = strategy.scenario[t].train
        if self.total is not None:
            keep = self.total // (t + 1)  # every finished task gets an equal share
            if self.x is not None:
                # each task's samples are in round-robin class order: its first `keep` stay class-balanced
                rows = torch.cat([(self.task == j).nonzero().flatten()[:keep] for j in range(t)])
                self.x, self.y, self.task = self.x[rows], self.y[rows], self.task[rows]
        else:
            keep = self.per_task
        idx = balanced_sample(data.y, keep, strategy.generator(t, 41))
        x, y, task = data.x[idx], data.y[idx], torch.full((len(idx),), t, dtype=torch.long)
        if self.x is None:
            self.x, self.y, self.task = x, y, task
        else:
            self.x, self.y, self.task = torch.cat([self.x, x]), torch.cat([self.y, y]), torch.cat([self.task, task])

    def replay_batch(self, strategy, n: int):
        if self.x is None or not len(self.x):
            return None
        # the Loop seeds torch's generator at every epoch: the draws are reproducible and resume-safe
        idx = torch.randint(0, len(self.x), (self.batch or n,))
        x = strategy.transform(self.x[idx].to(strategy.device), train=True)
        return x, self.y[idx].to(strategy.device), self.task[idx].to(strategy.device)

    def sample_bytes(self, strategy) -> float:
        one = strategy.scenario[0].train.x[:1]
        return float(tensor_bytes(one) + 2 * 8)  # the image, its label and its task id

    def bytes_per_task(self, strategy):
        if self.per_task is None:
            return 0.0, ""
        return self.per_task * self.sample_bytes(strategy), f"{self.per_task} replayed samples"

    def fixed_bytes(self, strategy) -> float:
        return 0.0 if self.total is None else self.total * self.sample_bytes(strategy)

    def describe(self):
        return {"buffer_per_task": self.per_task, "buffer_total": self.total, "replay_batch": self.batch,
                "stored": len(self.x) if self.x is not None else 0}

    def get_extra_state(self):
        return {} if self.x is None else {"x": self.x, "y": self.y, "task": self.task}

    def set_extra_state(self, state) -> None:
        self.x, self.y, self.task = state.get("x"), state.get("y"), state.get("task")


@METHODS.register("er", tags=("continual",))
class ExperienceReplay(ContinualStrategy):
    class Config(DenseParams):
        buffer_per_task: Optional[int] = Field(200, ge=1, description="samples kept of every finished task (the buffer grows)")
        buffer_total: Optional[int] = Field(None, ge=1, description="instead: a fixed buffer of this many samples shared equally "
                                            "by the finished tasks (set buffer_per_task: null)")
        replay_batch: Optional[int] = Field(None, ge=1, description="replayed samples added to each batch (default: the batch size)")

        @model_validator(mode="after")
        def _one_buffer_size(self):
            if (self.buffer_per_task is None) == (self.buffer_total is None):
                raise ValueError("give exactly one of buffer_per_task and buffer_total (set the other to null)")
            return self

    def __init__(self, params, ctx):
        tasks = len(ctx.scenario or ())
        if params.buffer_total is not None and tasks and params.buffer_total < tasks:
            raise ConfigError(f"method.buffer_total={params.buffer_total} leaves no sample for some of the scenario's {tasks} tasks "
                              f"(shared equally); set buffer_total >= {tasks} or use buffer_per_task")
        super().__init__(params, ctx)

    def make_plugins(self):
        p = self.params
        return [ReplayPlugin(p.buffer_per_task, p.buffer_total, p.replay_batch)]

"""Learning without forgetting (Li & Hoiem 2016): after each task a frozen copy of the network (the teacher) is kept;
while learning the next task, the network's outputs for the old tasks on the *new* task's images are distilled
towards the teacher's:

    distill_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)),   T = ``temperature``

taken over each old task's head and averaged over the old heads (``head: per_task``; so the weight means the same at
5 and 36 tasks), over the old classes (``union``), or over the one shared head (``shared``). Stored: one fp32 copy
of the previous network (``fixed_bytes``), plus the per-task head rows when the head is not shared."""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from ..methods.base import METHODS
from .plugins import ContinualPlugin, tensor_bytes
from .strategy import ContinualStrategy, DenseParams


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over samples."""
    log_p = F.log_softmax(student / temperature, 1)
    q = F.softmax(teacher / temperature, 1)
    return temperature ** 2 * F.kl_div(log_p, q, reduction="batchmean")


class LwFPlugin(ContinualPlugin):
    name = "lwf"

    def __init__(self, temperature: float, weight: float):
        super().__init__()
        self.temperature, self.weight = temperature, weight
        self.teacher: List[torch.nn.Module] = []  # a list: the frozen copy is no submodule (no parameters, no train())
        self.teacher_tasks = 0

    def after_task(self, strategy, t: int) -> None:
        self.snapshot(strategy, t + 1)

    def snapshot(self, strategy, tasks: int) -> None:
        teacher = copy.deepcopy(strategy.net).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher, self.teacher_tasks = [teacher], tasks

    def loss(self, strategy, x, out, tasks) -> Optional[torch.Tensor]:
        if not self.teacher:
            return None
        with torch.no_grad():
            old = self.teacher[0](x)
        T, head = self.temperature, strategy.head
        if head == "shared":
            term = distillation(out, old, T)
        elif head == "union":
            seen = sum(strategy.task_classes[: self.teacher_tasks])
            term = distillation(out[:, :seen], old[:, :seen], T)
        else:
            heads = [(strategy.class_offsets[j], strategy.task_classes[j]) for j in range(self.teacher_tasks)]
            term = torch.stack([distillation(out[:, lo:lo + k], old[:, lo:lo + k], T) for lo, k in heads]).mean()
        return self.weight * term

    def fixed_bytes(self, strategy) -> float:
        return float(tensor_bytes(*strategy.net.state_dict().values()))  # the previous network, buffers included

    def describe(self):
        return {"temperature": self.temperature, "distill_weight": self.weight}

    def get_extra_state(self):
        if not self.teacher:
            return {}
        return {"tasks": torch.tensor(self.teacher_tasks), **{f"teacher.{k}": v for k, v in self.teacher[0].state_dict().items()}}

    def set_extra_state(self, state) -> None:
        self.teacher, self.teacher_tasks = [], 0
        self._pending = state  # the network to copy is the strategy's: rebuilt in before_task (see LwF.before_task)

    def restore(self, strategy) -> None:
        state = getattr(self, "_pending", None)
        self._pending = None
        if state:
            self.snapshot(strategy, int(state["tasks"]))
            self.teacher[0].load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})


@METHODS.register("lwf", tags=("continual",))
class LwF(ContinualStrategy):
    class Config(DenseParams):
        temperature: float = Field(2.0, gt=0, description="distillation temperature T (Li & Hoiem: 2)")
        distill_weight: float = Field(1.0, ge=0, description="weight of the distillation term (Li & Hoiem's lambda_o: 1)")

    def make_plugins(self):
        return [LwFPlugin(self.params.temperature, self.params.distill_weight)]

    def before_task(self, t: int) -> None:
        self.plugins[0].restore(self)  # after a resume: the teacher from the checkpoint
        super().before_task(t)

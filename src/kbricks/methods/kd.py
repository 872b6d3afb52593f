"""Hinton knowledge distillation (KD): student matches the teacher's temperature-softened outputs.

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T))  +  (1 - alpha) * CE(s, y)   (KL reduced by batch mean)
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from pydantic import Field

from ..models.frozen import task_logits
from ..models.spec import NetworkSpec
from ._teacher import TEACHER_HELP, load_teacher
from .base import METHODS, Batch, Method, MethodContext, MethodParams
from .supervised import build_network, cross_entropy_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


@METHODS.register("kd", tags=("distillation",))
class KnowledgeDistillation(Method):
    class Config(MethodParams):
        teacher: NetworkSpec = Field(..., description=TEACHER_HELP)
        temperature: float = Field(4.0, gt=0)
        alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs the CE term")

    def __init__(self, params: "KnowledgeDistillation.Config", ctx: MethodContext):
        super().__init__()
        self.params = params
        self.tasks = ctx.tasks
        self.teacher = load_teacher(params.teacher, ctx)
        self.net = build_network(ctx)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        p = self.params
        out, t_out = self.net(batch.x), self.teacher(batch.x)
        if isinstance(out, list):  # multi-head: one KD + CE term per task head
            kd = torch.stack([kd_loss(o, task_logits(t_out, t, self.teacher.task_names), p.temperature) for o, t in zip(out, self.tasks)]).sum()
            ce = torch.stack([cross_entropy_loss(o, t.local_labels(batch.y, batch.latents)) for o, t in zip(out, self.tasks)]).sum()
        else:
            kd, ce = kd_loss(out, t_out, p.temperature), cross_entropy_loss(out, batch.y)
        return {"loss": p.alpha * kd + (1 - p.alpha) * ce, "kd": kd.detach(), "ce": ce.detach()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.net(x)

    def export_module(self):
        return self.net

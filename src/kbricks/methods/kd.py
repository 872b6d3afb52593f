"""Hinton knowledge distillation (KD): student matches the teacher's temperature-softened outputs.

loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T))  +  (1 - alpha) * CE(s, y)   (KL reduced by batch mean)
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import ConfigError
from ..models.foreign import NetworkSpec
from ..models.frozen import load_frozen, task_logits
from .base import METHODS, Batch, Method, MethodContext, MethodParams
from .supervised import build_network, cross_entropy_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), averaged over the batch."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def input_norm(ctx: MethodContext):
    tf = getattr(ctx, "transform", None)
    return {"mean": tf.mean, "std": tf.std} if tf is not None and tf.mean is not None else None


def example_inputs(ctx: MethodContext, n: int = 2) -> torch.Tensor:
    """A few training inputs as the method sees them (normalised): a loaded network's dummy batch."""
    x = ctx.train.x[:n]
    tf = getattr(ctx, "transform", None)
    return tf(x, train=False) if tf is not None else x


def load_teacher(spec: NetworkSpec, ctx: MethodContext, where: str = "method.teacher"):
    """The frozen teacher, fed the method's inputs, checked on one batch and against the data's label space."""
    teacher = load_frozen(spec, input_norm(ctx), example_inputs(ctx), where)
    check_teacher_outputs(teacher, ctx, f"{where} ({spec.describe()})")
    return teacher


TEACHER_HELP = ("the trained teacher: a kbricks run directory or model.json, a TorchScript file, or "
                "{path: package.module:factory, kwargs, weights, normalize} (docs/byo.md)")


def check_teacher_outputs(teacher, ctx: MethodContext, where: str) -> None:
    """KD needs the teacher to speak the student's label space (SSKT is the method for foreign label spaces)."""
    if teacher.task_names:
        missing = [t.name for t in ctx.tasks if t.name not in teacher.task_names]
        if missing:
            raise ConfigError(f"teacher {where} has no heads for tasks {missing}; its heads are {teacher.task_names}")
    elif teacher.num_outputs != ctx.train.num_classes:
        raise ConfigError(
            f"teacher {where} predicts {teacher.num_outputs} classes but the data has {ctx.train.num_classes}; "
            "KD needs a shared label space (use method sskt for sources with other label spaces)"
        )


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

"""FitNets (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets") as a kbricks method, from the public toolkit.

A student layer (the *guided* layer) is mapped by a learned regressor onto a teacher layer (the *hint*) and pulled
towards it by a mean squared error, while the student's logits learn from the teacher's (KD) and the labels (CE):

    loss = hint_weight * MSE(regressor(student_features), teacher_features) + alpha * KD + (1 - alpha) * CE

The paper trains in two stages (hint first, then KD); this is the common one-stage form. Layers default to the input
of each network's head, found by execution; the regressor is linear on flattened features (the paper's is a
convolution on feature maps). Use it with ``--import fitnets`` (this file on the path):

    PYTHONPATH=examples kbricks train examples/fitnets.yaml --import fitnets
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kbricks.errors import ConfigError
from kbricks.methods import METHODS, TEACHER_HELP, Batch, Method, MethodContext, MethodParams, example_inputs, load_teacher
from kbricks.methods.kd import kd_loss
from kbricks.methods.supervised import build_network
from kbricks.models import FeatureTap, NetworkSpec

LAYER_HELP = "'<layer>' (its output) or '<layer>:input', a name from named_modules(); default: the input of the head"


def fitnets_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, guided: torch.Tensor, hint: torch.Tensor,
                 y: torch.Tensor, hint_weight: float, temperature: float, alpha: float) -> Dict[str, torch.Tensor]:
    """``guided``: the regressed student features [B, D]; ``hint``: the teacher's [B, D]."""
    hint_term = F.mse_loss(guided, hint)
    kd, ce = kd_loss(student_logits, teacher_logits, temperature), F.cross_entropy(student_logits, y)
    loss = hint_weight * hint_term + alpha * kd + (1 - alpha) * ce
    return {"loss": loss, "hint": hint_term.detach(), "kd": kd.detach(), "ce": ce.detach()}


@METHODS.register("fitnets", tags=("distillation",))
class FitNets(Method):
    """FitNets: a student layer regressed onto a teacher layer (hint), plus KD and CE on the logits."""

    class Config(MethodParams):
        teacher: NetworkSpec = Field(..., description=TEACHER_HELP)
        teacher_layer: Optional[str] = Field(None, description="the teacher's hint layer: " + LAYER_HELP)
        student_layer: Optional[str] = Field(None, description="the student's guided layer: " + LAYER_HELP)
        hint_weight: float = Field(1.0, ge=0, description="weight of the hint (MSE) term")
        temperature: float = Field(4.0, gt=0)
        alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs the CE term")

    def __init__(self, params: "FitNets.Config", ctx: MethodContext):
        super().__init__()
        if any(t.kind == "latent" for t in ctx.tasks):
            raise ConfigError("method fitnets trains one classification head; these data have latent tasks (use method kd)")
        self.params = params
        spec = params.teacher
        if params.teacher_layer is not None:  # the teacher reads its features where its spec says
            spec = spec.model_copy(update={"features": params.teacher_layer})
        self.teacher = load_teacher(spec, ctx)
        self.net = build_network(ctx)
        self.student_tap = FeatureTap(self.net, params.student_layer, "method.student_layer")
        # one batch through both networks sizes the regressor (eval mode: the student's BatchNorm statistics stay)
        x = example_inputs(ctx)
        self.net.eval()
        with torch.no_grad():
            student_dim = self.student_tap(x)[1].shape[1]
            teacher_dim = self.teacher.features(x).shape[1]
        self.net.train()
        self.regressor = nn.Linear(student_dim, teacher_dim)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        p = self.params
        logits, features = self.student_tap(batch.x)  # one student pass: its output and the guided layer
        return fitnets_loss(logits, self.teacher(batch.x), self.regressor(features), self.teacher.features(batch.x), batch.y,
                            p.hint_weight, p.temperature, p.alpha)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def export_module(self) -> nn.Module:  # the student alone: the regressor only serves training
        return self.net

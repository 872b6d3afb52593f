"""Knowledge Factorization (Yang, Ye, Wang, ECCV 2022): one common-knowledge network (CKN) shared by all tasks
and one task-specific network (TSN) per task, trained with the InfoMax-Bottleneck (IMB) objective.

Factor network t = CKN + TSN_t:  logits_t = head_t(combine(z_c, z_t)),  z_c = CKN(x),  z_t ~ N(mu_t(x), sigma_t(x)^2).

Loss, summed over tasks t:
    kd_weight * T^2 KL(teacher_t^T || factor_t^T)      distillation of the teacher's task-t outputs
  + ce_weight * CE(factor_t, y_t)                       hard labels where they exist
  + beta      * KL(N(mu_t, sigma_t^2) || N(0, I))        bottleneck: minimise I(x; z_t) ...
  + task_weight * CE(task_head_t(z_t), y_t)              ... while keeping z_t predictive of task t on its own
plus infomax_weight * InfoNCE(g(z_c(view1)), g(z_c(view2)))  InfoMax: maximise I(x; z_c)

Class-partition tasks get one extra "other" output: factor t is distilled towards the teacher's tempered
distribution over [its classes, all other classes merged]. Its log-probabilities for its own classes are thereby
calibrated against the teacher's full softmax, which is what lets factor networks trained for different tasks be
concatenated into one classifier over the union of their classes without fine-tuning.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...config import ModelConfig
from ...core.hooks import Hook
from ...errors import ConfigError
from ...models import create_model
from ...models.factorized import FactorNetworks, TaskSpecificNetwork, combined_class_scores, task_output_size
from ...models.foreign import NetworkSpec
from ...models.frozen import task_logits
from ..base import METHODS, Batch, Method, MethodContext, MethodParams
from ..kd import TEACHER_HELP, kd_loss, load_teacher

# ---- pure loss functions -------------------------------------------------------------------------------------


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: each of the 2B embeddings must pick its other view among the 2B-1 others (cosine / temperature)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over dimensions, averaged over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()


def merge_other(logits: torch.Tensor, classes: Sequence[int], temperature: float) -> torch.Tensor:
    """Logits over [classes..., other] whose tempered softmax equals the full tempered softmax with the
    non-task classes' probability merged into 'other'."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[list(classes)] = True
    inside = logits[:, list(classes)]
    other = temperature * torch.logsumexp(logits[:, ~keep] / temperature, dim=1, keepdim=True)
    return torch.cat([inside, other], dim=1)


def imb_loss(
    factor_logits: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    labels: Sequence[Optional[torch.Tensor]],
    mus: Sequence[torch.Tensor],
    logvars: Sequence[torch.Tensor],
    views: Optional[Tuple[torch.Tensor, torch.Tensor]],
    temperature: float = 4.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.1,
    beta: float = 1e-3,
    infomax_weight: float = 0.1,
    tau: float = 0.2,
    task_only_logits: Optional[Sequence[torch.Tensor]] = None,
    task_weight: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """The InfoMax-Bottleneck objective; returns named terms (unweighted) and the weighted total ``loss``.

    ``task_only_logits`` are predictions from z_t alone: distilled from the same teacher targets (and labels),
    they keep the task-specific code informative about its task while the KL term squeezes the rest out."""
    kd = torch.stack([kd_loss(f, t, temperature) for f, t in zip(factor_logits, teacher_targets)]).sum()
    ce_terms = [F.cross_entropy(f, y) for f, y in zip(factor_logits, labels) if y is not None]
    ce = torch.stack(ce_terms).sum() if ce_terms else kd.new_zeros(())
    kl = torch.stack([gaussian_kl(m, lv) for m, lv in zip(mus, logvars)]).sum()
    nce = info_nce(views[0], views[1], tau) if views is not None and infomax_weight > 0 else kd.new_zeros(())
    task = kd.new_zeros(())
    if task_only_logits is not None and task_weight > 0:
        task = torch.stack([
            kd_loss(a, t, temperature) + (F.cross_entropy(a, y) if y is not None else 0.0)
            for a, t, y in zip(task_only_logits, teacher_targets, labels)
        ]).sum()
    total = kd_weight * kd + ce_weight * ce + beta * kl + infomax_weight * nce + task_weight * task
    return {"loss": total, "kd": kd.detach(), "ce": ce.detach(), "kl": kl.detach(), "infonce": nce.detach(), "task_only": task.detach()}


# ---- modules -------------------------------------------------------------------------------------------------


# ---- the method ----------------------------------------------------------------------------------------------


@METHODS.register("kf", tags=("factorization",))
class KnowledgeFactorization(Method):
    class Config(MethodParams):
        teacher: NetworkSpec = Field(..., description=TEACHER_HELP)
        tsn: ModelConfig = Field(default_factory=lambda: ModelConfig(name="small_cnn", kwargs={"widths": [16, 32]}))
        tsn_dim: int = Field(8, ge=1, description="size of each task-specific representation z_t")
        combine: Literal["concat", "sum"] = Field("concat", description="sum needs tsn_dim == CKN feature size (official code)")
        temperature: float = Field(4.0, gt=0)
        kd_weight: float = Field(1.0, ge=0)
        ce_weight: float = Field(0.1, ge=0)
        beta: float = Field(1e-3, ge=0, description="bottleneck weight on KL(q(z_t|x) || N(0, I))")
        task_weight: float = Field(1.0, ge=0, description="weight of the task-only head on z_t (keeps z_t predictive)")
        infomax_weight: float = Field(0.1, ge=0, description="weight of the InfoNCE term on the CKN")
        tau: float = Field(0.2, gt=0, description="InfoNCE temperature")
        proj_dim: int = Field(64, ge=1)
        view_noise: float = Field(0.1, ge=0, description="Gaussian noise added to the second InfoNCE view")

    def __init__(self, params: "KnowledgeFactorization.Config", ctx: MethodContext):
        super().__init__()
        self.params, self.tasks, self.transform, self.cfg = params, ctx.tasks, ctx.transform, ctx.cfg
        self.shape = {"in_channels": ctx.train.in_channels, "image_size": ctx.train.image_size}
        self.num_classes = ctx.train.num_classes
        self.teacher = load_teacher(params.teacher, ctx)
        shape = dict(in_channels=ctx.train.in_channels, image_size=ctx.train.image_size)
        ckn = create_model(ctx.cfg.model.name, num_classes=0, **shape, **ctx.cfg.model.kwargs)
        if params.combine == "sum" and params.tsn_dim != ckn.feature_dim:
            raise ConfigError(f"method.combine=sum needs method.tsn_dim == CKN feature size ({ckn.feature_dim})")
        tsns = [
            TaskSpecificNetwork(
                create_model(params.tsn.name, num_classes=0, **shape, **params.tsn.kwargs),
                params.tsn_dim, ckn.feature_dim, task_output_size(t, self.num_classes), params.combine,
            )
            for t in self.tasks
        ]
        self.factors = FactorNetworks(ckn, tsns)
        d = ckn.feature_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, params.proj_dim))

    def teacher_targets(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = self.teacher(x)
        targets = []
        for t in self.tasks:
            logits = task_logits(out, t, self.teacher.task_names) if t.latent is not None else out
            if t.classes is not None:
                logits = merge_other(logits, t.classes, self.params.temperature) if task_output_size(t, self.num_classes) > t.num_classes else logits[:, list(t.classes)]
            targets.append(logits)
        return targets

    def task_labels(self, batch: Batch) -> List[torch.Tensor]:
        labels = []
        for t in self.tasks:
            y = t.local_labels(batch.y, batch.latents)
            labels.append(torch.where(y < 0, torch.full_like(y, t.num_classes), y))  # non-members -> 'other'
        return labels

    def second_view(self, batch: Batch) -> torch.Tensor:
        if batch.raw is not None and self.transform is not None:
            view = self.transform(batch.raw, train=True)
        else:
            view = batch.x
        return view + self.params.view_noise * torch.randn_like(view)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        p = self.params
        x = batch.x
        n = x.shape[0]
        use_views = p.infomax_weight > 0
        z_all = self.factors.ckn.features(torch.cat([x, self.second_view(batch)]) if use_views else x)
        z_c = z_all[:n]
        logits, mus, logvars, task_only = self.factors.tsn_outputs(x, z_c, sample=True)
        views = (self.projector(z_c), self.projector(z_all[n:])) if use_views else None
        return imb_loss(
            logits, self.teacher_targets(x), self.task_labels(batch), mus, logvars, views,
            p.temperature, p.kd_weight, p.ce_weight, p.beta, p.infomax_weight, p.tau, task_only, p.task_weight,
        )

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        logits = self.factors(x)
        if all(t.classes is not None for t in self.tasks):
            return combined_class_scores(logits, self.tasks, self.num_classes, [self.params.temperature] * len(self.tasks))
        return logits

    def export_module(self) -> nn.Module:
        return self.factors

    def hooks(self) -> List[Hook]:
        return [ExportBricks(self)]

    def report(self, exp, run_dir, baseline=None):
        from .report import kf_report

        return kf_report(exp, run_dir, baseline)


class ExportBricks(Hook):
    """When training ends, write the bricks: ``run_dir/bricks/ckn.{json,safetensors}`` and one
    ``tsn-<task>.{json,safetensors}`` per task."""

    def __init__(self, method: KnowledgeFactorization):
        self.method = method

    def on_fit_end(self, trainer, summary) -> None:
        from .bricks import export_bricks

        m, run_dir, card = self.method, trainer.run_dir, trainer.card
        p, cfg = m.params, m.cfg
        ckn_arch = {"name": cfg.model.name, "kwargs": cfg.model.kwargs, **m.shape, "feature_dim": m.factors.ckn.feature_dim}
        tsn_arch = {"name": p.tsn.name, "kwargs": p.tsn.kwargs, "dim": p.tsn_dim, "combine": p.combine}
        provenance = {
            "method": "kf",
            "teacher": p.teacher.to_json(),
            "teacher_fingerprint": getattr(m.teacher, "card", {}).get("fingerprint"),
            "data": cfg.data.model_dump(mode="json"),
            "seed": cfg.seed,
            "run_dir": str(run_dir),
        }
        metrics = {k.split("/", 1)[1]: v for k, v in card["metrics"]["final"].items()}
        export_bricks(m.factors, m.tasks, run_dir / "bricks", ckn_arch, tsn_arch, m.num_classes, card["classes"], card["normalize"],
                      provenance, metrics, temperature=p.temperature)

"""Knowledge Factorization (Yang, Ye, Wang, ECCV 2022): one common-knowledge network (CKN) shared by all tasks
and one task-specific network (TSN) per task, trained with the InfoMax-Bottleneck (IMB) objective.

Factor network t = CKN + TSN_t:  logits_t = head_t(combine(z_c, z_t)),  z_c = CKN(x),  z_t from TSN_t(x).

Loss, summed over tasks t (docs/methods.md has every term next to the paper's and the official code's values):
    kd_weight   * T^2 KL(teacher_t^T || factor_t^T)      distillation of the teacher's task-t outputs
  + ce_weight   * CE(factor_t, y_t)                      hard labels where they exist (optionally label-smoothed)
  + beta        * bottleneck(z_t)                        minimise I(x; z_t): per-sample VIB KL, or the official
                                                         batch-statistics KL
  + task_weight * task-only head loss on z_t alone       ... while keeping z_t predictive of task t
plus infomax_weight * InfoMax(z_c)                       maximise I(x; z_c): the official teacher-vs-CKN bound at
                                                         matched layers, or a two-view InfoNCE of the CKN

Class-partition tasks get one extra "other" output: factor t is distilled towards the teacher's tempered
distribution over [its classes, all other classes merged]. Its log-probabilities for its own classes are thereby
calibrated against the teacher's full softmax, which is what lets factor networks trained for different tasks be
concatenated into one classifier over the union of their classes without fine-tuning.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
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
from ...models.frozen import FrozenNetwork, task_logits
from ...models.spec import NetworkSpec
from ...models.taps import FeatureTap
from .._teacher import TEACHER_HELP, load_teacher
from ..base import METHODS, Batch, Method, MethodContext, MethodParams
from ..kd import kd_loss

# ---- pure loss functions -------------------------------------------------------------------------------------


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: each of the 2B embeddings must pick its other view among the 2B-1 others (cosine / temperature)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def infomax_bound(u: torch.Tensor, v: torch.Tensor, bound: str = "official") -> torch.Tensor:
    """Negative Donsker-Varadhan-style bound between paired rows of ``u`` (projected teacher features) and ``v``
    (CKN features) with a fixed cosine critic S = norm(u) norm(v)^T, positives on the diagonal.

    ``official``: as the official code computes it: joint = trace(S) / B^2 (the mean over all B^2 entries of S
    masked to its diagonal) and marginal = mean over all B^2 entries of exp(S masked off the diagonal), the diagonal
    contributing exp(0) = 1 each. ``dv``: the textbook bound, joint = trace(S) / B, marginal = mean of exp(S) over
    the B(B-1) off-diagonal pairs. Loss = -(joint - log marginal)."""
    if bound not in ("official", "dv"):
        raise ValueError(f"unknown InfoMax bound {bound!r} (official or dv)")
    s = F.normalize(u, dim=1, eps=1e-10) @ F.normalize(v, dim=1, eps=1e-10).t()
    b = s.shape[0]
    diagonal = s.diagonal()
    # sums without a B x B mask: the off-diagonal sum of exp(S) is the full sum less the diagonal's (|S| <= 1)
    off_diagonal = s.exp().sum() - diagonal.exp().sum()
    if bound == "official":
        joint = diagonal.sum() / (b * b)
        marginal = (off_diagonal + b) / (b * b)
    else:
        joint = diagonal.mean()
        marginal = off_diagonal / (b * (b - 1))
    return -(joint - marginal.log())


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over dimensions, averaged over the batch (per-sample VIB)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1).mean()


def batch_gaussian_kl(z: torch.Tensor) -> torch.Tensor:
    """The official code's bottleneck: KL(N(mean_B(z), var_B(z)) || N(0, 1)) per dimension from the batch's
    statistics (unbiased variance), averaged over dimensions."""
    mu, var = z.mean(0), z.var(0, unbiased=True).clamp_min(1e-8)
    return -0.5 * (1 + var.log() - mu.pow(2) - var).mean()


def effective_label_smoothing(eps: float, form: str = "torch") -> float:
    """The eps of torch's label smoothing that gives ``form``'s targets. mmcls's ``classy_vision`` mode (the official
    KF code) smooths to (onehot + eps/K) / (1 + eps) = (1 - eps') onehot + eps'/K with eps' = eps / (1 + eps)."""
    if form == "torch":
        return eps
    if form == "classy_vision":
        return eps / (1.0 + eps)
    raise ValueError(f"unknown label smoothing form {form!r} (torch or classy_vision)")


def merge_other(logits: torch.Tensor, classes: Sequence[int], temperature: float) -> torch.Tensor:
    """Logits over [classes..., other] whose tempered softmax equals the full tempered softmax with the
    non-task classes' probability merged into 'other'."""
    inside, outside = _class_split(tuple(classes), logits.shape[1], logits.device)
    other = temperature * torch.logsumexp(logits.index_select(1, outside) / temperature, dim=1, keepdim=True)
    return torch.cat([logits.index_select(1, inside), other], dim=1)


_SPLITS: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _class_split(classes: Tuple[int, ...], num_classes: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index tensors of a task's classes and of the other classes, built once per (classes, width, device)."""
    key = (classes, num_classes, device)
    split = _SPLITS.get(key)
    if split is None:
        keep = torch.zeros(num_classes, dtype=torch.bool)
        keep[list(classes)] = True
        split = _SPLITS[key] = (torch.tensor(classes, dtype=torch.long, device=device), (~keep).nonzero().squeeze(1).to(device))
    return split


def imb_loss(
    factor_logits: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    labels: Sequence[Optional[torch.Tensor]],
    mus: Sequence[torch.Tensor],
    logvars: Sequence[torch.Tensor],
    infomax: Optional[torch.Tensor] = None,
    temperature: float = 4.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.1,
    beta: float = 1e-3,
    infomax_weight: float = 0.1,
    task_only_logits: Optional[Sequence[torch.Tensor]] = None,
    task_weight: float = 1.0,
    bottleneck: str = "vib",
    task_head_loss: str = "kd+ce",
    label_smoothing: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """The InfoMax-Bottleneck objective; returns the named terms (unweighted) and the weighted total ``loss``.

    ``infomax``: the InfoMax loss already computed (its inputs depend on the variant), or None.
    ``bottleneck``: ``vib`` = per-sample KL(N(mu, sigma^2) || N(0, I)); ``batch`` = the official batch-statistics KL
    of the (deterministic) codes ``mus``. ``task_only_logits`` are predictions from z_t alone, trained towards the
    same teacher targets and labels (``kd+ce``) or the labels only (``ce``, the official head)."""
    ce_fn = lambda a, y: F.cross_entropy(a, y, label_smoothing=label_smoothing)  # noqa: E731
    kd = torch.stack([kd_loss(f, t, temperature) for f, t in zip(factor_logits, teacher_targets)]).sum()
    zero = kd.new_zeros(())
    ce_terms = [ce_fn(f, y) for f, y in zip(factor_logits, labels) if y is not None]
    ce = torch.stack(ce_terms).sum() if ce_terms else zero
    if bottleneck == "vib":
        kl = torch.stack([gaussian_kl(m, lv) for m, lv in zip(mus, logvars)]).sum()
    elif bottleneck == "batch":
        kl = torch.stack([batch_gaussian_kl(m) for m in mus]).sum()
    else:
        raise ValueError(f"unknown bottleneck {bottleneck!r} (vib or batch)")
    im = infomax if infomax is not None else zero
    task = zero
    if task_only_logits is not None:
        if task_head_loss not in ("kd+ce", "ce"):
            raise ValueError(f"unknown task_head_loss {task_head_loss!r} (kd+ce or ce)")
        terms = []
        for a, t, y in zip(task_only_logits, teacher_targets, labels):
            term = kd_loss(a, t, temperature) if task_head_loss == "kd+ce" else zero
            terms.append(term + (ce_fn(a, y) if y is not None else zero))
        task = torch.stack(terms).sum()
    total = kd_weight * kd + ce_weight * ce + beta * kl + infomax_weight * im + task_weight * task
    return {"loss": total, "kd": kd.detach(), "ce": ce.detach(), "bottleneck": kl.detach(), "infomax": im.detach(),
            "task_only": task.detach()}


# ---- modules -------------------------------------------------------------------------------------------------


def projector(d_in: int, d_out: int) -> nn.Sequential:
    """The official InfoMax projector g_l, applied to teacher features only: Linear -> BN -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True), nn.Linear(d_out, d_out))


# ---- the method ----------------------------------------------------------------------------------------------

INFOMAX_DEFAULT_WEIGHT = {"teacher": 1.0, "views": 0.1}  # the official code's lambda_feat; kbricks round 1's InfoNCE weight


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
        label_smoothing: float = Field(0.0, ge=0, lt=1, description="of every CE term (official code: 0.1)")
        label_smoothing_form: Literal["torch", "classy_vision"] = Field(
            "torch", description="torch: targets (1 - eps) onehot + eps/K; classy_vision: the official code's (mmcls) "
                                 "(onehot + eps/K) / (1 + eps), i.e. torch's form at eps / (1 + eps)")
        bottleneck: Literal["vib", "batch"] = Field(
            "vib", description="vib: per-sample Gaussian KL of a sampled z_t; batch: the official batch-statistics KL of a deterministic z_t")
        beta: float = Field(1e-3, ge=0, description="bottleneck weight")
        task_weight: float = Field(1.0, ge=0, description="weight of the task-only head on z_t (keeps z_t predictive)")
        task_head_loss: Literal["kd+ce", "ce"] = Field("kd+ce", description="what the task-only head learns (official: ce)")
        infomax: Literal["teacher", "views"] = Field(
            "teacher", description="teacher: the official bound between projected teacher features and CKN features; "
                                   "views: InfoNCE between two augmented views through the CKN")
        infomax_weight: Optional[float] = Field(
            None, ge=0, description="weight of the InfoMax term on the CKN; default: 1.0 for teacher (official), 0.1 for views")
        infomax_bound: Literal["official", "dv"] = Field("official", description="infomax=teacher: the code's normalisation or textbook DV")
        infomax_layers: List[Tuple[str, str]] = Field(
            default_factory=list,
            description="infomax=teacher: [teacher layer, CKN layer] pairs (names from named_modules(), outputs average-pooled); "
                        "empty: the final features of both")
        tau: float = Field(0.2, gt=0, description="infomax=views: InfoNCE temperature")
        proj_dim: int = Field(64, ge=1, description="infomax=views: projection size")
        view_noise: float = Field(0.1, ge=0, description="infomax=views: Gaussian noise added to the second view")

    def __init__(self, params: "KnowledgeFactorization.Config", ctx: MethodContext):
        super().__init__()
        chosen = set(params.model_fields_set)
        if params.infomax_weight is None:
            params = params.model_copy(update={"infomax_weight": INFOMAX_DEFAULT_WEIGHT[params.infomax]})
        self.params, self.tasks, self.transform, self.cfg = params, ctx.tasks, ctx.transform, ctx.cfg
        self.shape = {"in_channels": ctx.train.in_channels, "image_size": ctx.train.image_size}
        self.num_classes = ctx.train.num_classes
        self.teacher = self._load_teacher(params, ctx)
        shape = dict(in_channels=ctx.train.in_channels, image_size=ctx.train.image_size)
        ckn = self._build_ckn(ctx)
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
        self.teacher_tap = self.ckn_tap = None
        if params.infomax_weight > 0 and params.infomax == "teacher":
            try:
                self.projectors = self._build_teacher_projectors(ctx)
            except ConfigError as exc:
                if chosen & {"infomax", "infomax_layers"}:
                    raise
                # the default variant needs readable teacher features (a TorchScript teacher without features(x)
                # has none): fall back to the two-view variant, say so, and record it in the run's params
                print(f"kbricks: warning: {exc}; using method.infomax=views (set method.infomax to choose)", file=sys.stderr)
                weight = params.infomax_weight if "infomax_weight" in chosen else INFOMAX_DEFAULT_WEIGHT["views"]
                self.params = params = params.model_copy(update={"infomax": "views", "infomax_weight": weight})
        if params.infomax_weight > 0 and params.infomax == "views":
            d = ckn.feature_dim
            self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, params.proj_dim))

    def _load_teacher(self, params: "KnowledgeFactorization.Config", ctx: MethodContext):
        """The frozen teacher (a subclass may load several: methods/kf/amalgamate.py)."""
        return load_teacher(params.teacher, ctx)

    def _build_ckn(self, ctx: MethodContext) -> nn.Module:
        """A fresh CKN from ``model`` (a subclass may load a frozen CKN brick instead: methods/kf/amalgamate.py)."""
        shape = dict(in_channels=ctx.train.in_channels, image_size=ctx.train.image_size)
        return create_model(ctx.cfg.model.name, num_classes=0, **shape, **ctx.cfg.model.layers(), **ctx.cfg.model.kwargs)

    def _build_teacher_projectors(self, ctx: MethodContext) -> nn.ModuleList:
        """One projector per matched layer pair, sized by a probe forward pass (the CKN in eval mode, so its
        BatchNorm statistics are untouched)."""
        layers = self.params.infomax_layers
        if layers:
            self.teacher_tap = FeatureTap(self.teacher.net, [t for t, _ in layers], "method.infomax_layers: the teacher", pool=True)
            self.ckn_tap = FeatureTap(self.factors.ckn, [c for _, c in layers], "method.infomax_layers: the CKN", pool=True)
        # the teacher's features: its own features(x), else the input of its head found by execution (FrozenNetwork.features)
        probe = torch.zeros(2, *ctx.train.input_shape)
        ckn = self.factors.ckn
        with torch.no_grad():
            was = ckn.training
            ckn.eval()
            try:
                t_feats, c_feats = self._infomax_features(self.transform(probe, train=False) if self.transform else probe)
            except ConfigError as exc:
                raise ConfigError(f"method.infomax=teacher: {exc}; name the layers to match with method.infomax_layers, "
                                  "or use method.infomax=views") from None
            finally:
                ckn.train(was)
        if any(f.dim() != 2 for f in (*t_feats, *c_feats)):
            shapes = [list(f.shape) for f in (*t_feats, *c_feats)]
            raise ConfigError(f"method.infomax=teacher: features must be [batch, dim], got {shapes}; name the layers with "
                              "method.infomax_layers (outputs are average-pooled) or use method.infomax=views")
        return nn.ModuleList(projector(t.shape[1], c.shape[1]) for t, c in zip(t_feats, c_feats))

    def _infomax_features(self, x: torch.Tensor, z_c: Optional[torch.Tensor] = None, teacher_out=None):
        """(teacher features, CKN features) at the matched layers. With taps, the forward passes that already ran
        (``z_c``, ``teacher_out``, under :meth:`_tapping`) filled them; otherwise the final features are used."""
        if self.teacher_tap is not None:
            if teacher_out is None:
                with self.teacher_tap.watching():
                    self.teacher(x)
            if z_c is None:
                with self.ckn_tap.watching():
                    self.factors.ckn.features(x)
            return self.teacher_tap.take(), self.ckn_tap.take()
        return [self.teacher.features(x)], [self.factors.ckn.features(x) if z_c is None else z_c]

    def _teacher_forward(self, x: torch.Tensor):
        """The frozen teacher's outputs; its input adapter is skipped while it maps inputs to themselves (the teacher
        trained on the same normalisation), which it re-checks only when its statistics change."""
        teacher = self.teacher
        if type(teacher).forward is not FrozenNetwork.forward:
            return teacher(x)
        a = teacher.adapter
        stamp = (id(a), a.spec, *((b.data_ptr(), b._version) for b in a.buffers()))
        if getattr(self, "_adapter_stamp", None) != stamp:
            spec = a.spec
            self._adapter_identity = (spec.channels is None and spec.size is None and spec.shape is None
                                      and torch.equal(a.data_mean, a.net_mean) and torch.equal(a.data_std, a.net_std))
            self._adapter_stamp = stamp
        if not self._adapter_identity:
            return teacher(x)
        with torch.no_grad():
            return teacher.net(x)

    def _tapping(self) -> ExitStack:
        """The matched-layer taps (if any) watching the forward passes run inside this context."""
        stack = ExitStack()
        if self.teacher_tap is not None and self.params.infomax_weight > 0:
            stack.enter_context(self.teacher_tap.watching())
            stack.enter_context(self.ckn_tap.watching())
        return stack

    @property
    def assembly_temperature(self) -> float:
        """The temperature at which a factor's outputs are calibrated against the teacher: T when distilled, 1 when
        trained on hard labels only (kd_weight = 0)."""
        return self.params.temperature if self.params.kd_weight > 0 else 1.0

    def teacher_targets(self, out) -> List[torch.Tensor]:
        targets = []
        for t in self.tasks:
            logits = task_logits(out, t, self.teacher.task_names) if t.latent is not None else out
            if t.classes is not None:
                if task_output_size(t, self.num_classes) > t.num_classes:
                    logits = merge_other(logits, t.classes, self.params.temperature)
                else:
                    logits = logits.index_select(1, _class_split(tuple(t.classes), logits.shape[1], logits.device)[0])
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
        two_views = p.infomax_weight > 0 and p.infomax == "views"
        with self._tapping():
            z_all = self.factors.ckn.features(torch.cat([x, self.second_view(batch)]) if two_views else x)
            teacher_out = self._teacher_forward(x)
        z_c = z_all[:n]
        # batch bottleneck: deterministic codes (the official TSN); vib: z_t sampled by reparameterisation
        logits, mus, logvars, task_only = self.factors.tsn_outputs(x, z_c, sample=p.bottleneck == "vib")
        infomax = None
        if two_views:
            infomax = info_nce(self.projector(z_c), self.projector(z_all[n:]), p.tau)
        elif p.infomax_weight > 0:
            t_feats, c_feats = self._infomax_features(x, z_c, teacher_out)
            infomax = torch.stack([infomax_bound(g(t), c, p.infomax_bound) for g, t, c in zip(self.projectors, t_feats, c_feats)]).mean()
        out = imb_loss(
            logits, self.teacher_targets(teacher_out), self.task_labels(batch), mus, logvars, infomax,
            p.temperature, p.kd_weight, p.ce_weight, p.beta, p.infomax_weight, task_only, p.task_weight,
            p.bottleneck, p.task_head_loss, effective_label_smoothing(p.label_smoothing, p.label_smoothing_form),
        )
        if p.bottleneck == "batch":  # the log-variance heads are unused: keep them in the graph for DDP
            out["loss"] = out["loss"] + 0.0 * sum(lv.sum() for lv in logvars)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        logits = self.factors(x)
        if all(t.classes is not None for t in self.tasks):
            return combined_class_scores(logits, self.tasks, self.num_classes, [self.assembly_temperature] * len(self.tasks))
        return logits

    def export_module(self) -> nn.Module:
        return self.factors

    def hooks(self) -> List[Hook]:
        return [ExportBricks(self)]

    def card(self):
        return {"network": "factors"}  # model.safetensors holds factor networks: load the bricks instead

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
                      provenance, metrics, temperature=m.assembly_temperature)

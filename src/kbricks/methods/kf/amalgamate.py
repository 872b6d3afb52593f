"""Growing a brick library: extend a frozen CKN with new TSN bricks, and amalgamate several teachers into one CKN.

``kf_amalgamate``: Knowledge Factorization of several teachers at once. Each teacher speaks its own label space,
given as the global class id of each of its outputs (``classes``); one CKN is trained for all of them and one TSN per
task, each TSN distilled from the teacher that covers its classes. ``kf_extend``: the same with one teacher and a
*frozen* CKN read from a brick file (``ckn``): only the new TSNs train, the CKN's weights and BatchNorm statistics stay
bit for bit as they were, and the new TSN bricks bind to that CKN's fingerprint, so they assemble with the bricks made
with it before. ``kf_amalgamate`` takes ``ckn`` too (amalgamate new teachers onto an existing CKN).

The target of a TSN, teacher k, task classes S inside the teacher's label space L_k, tempered at T:

    sample of a class in L_k:      [p_k^T(c | x) for c in S,  sum of p_k^T over L_k \\ S]       (KF's merged "other")
    sample of a class outside L_k: [0 for c in S,  1]                                         (all mass on "other")

i.e. the tempered softmax of a union teacher p(c | x) = P(x in L_k) p_k(c | x), with P(x in L_k) read from the label
(the data are labelled in the global label space). With one teacher over all classes it is KF's target exactly. The
assembled classifier reads each factor's tempered log-probability of its own classes (``combined_class_scores``): a
factor that learned "other" for samples outside its teacher's classes scores them low, so the union's argmax is taken
inside the right factor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...core.checkpoint import load_state_into
from ...core.hooks import Hook
from ...data.tasks import Task, class_partition
from ...errors import ConfigError
from ...models.factorized import task_output_size
from ...models.spec import NetworkSpec, as_spec
from .._teacher import TEACHER_HELP, load_network
from ..base import METHODS, Batch, Method, MethodContext, MethodParams
from ..kd import kd_loss
from .bricks import _write, build_ckn, load_brick
from .method import KnowledgeFactorization

LOG_FLOOR = -30.0  # tempered log-probability given to an impossible output (exp(-30) ~ 1e-13): keeps the KL finite


def gated_targets(logits: torch.Tensor, member: torch.Tensor, inside: Sequence[int], rest: Sequence[int],
                  temperature: float, other: bool) -> torch.Tensor:
    """Teacher logits -> target logits of one TSN (see the module docstring): their softmax at ``temperature`` is the
    teacher's tempered distribution over [its outputs ``inside``, the rest merged into "other"] for members of the
    teacher's label space, and all mass on "other" for the others. ``other=False``: the task has no "other" output
    (it covers every class): the teacher's logits of ``inside``."""
    t = temperature
    if not other:
        return logits[:, list(inside)]
    lp = F.log_softmax(logits / t, dim=1)
    q_in = lp[:, list(inside)]
    q_other = torch.logsumexp(lp[:, list(rest)], dim=1) if len(rest) else torch.full_like(lp[:, 0], float("-inf"))
    q_in = torch.where(member[:, None], q_in, torch.full_like(q_in, float("-inf")))
    q_other = torch.where(member, q_other, torch.zeros_like(q_other))
    return t * torch.cat([q_in, q_other[:, None]], dim=1).clamp_min(LOG_FLOOR)


class TeacherEntry(BaseModel):
    """One teacher of an amalgamation: the network, the global class id of each of its outputs, its tasks."""

    model_config = ConfigDict(extra="forbid")
    path: Union[str, NetworkSpec] = Field(..., description=TEACHER_HELP)
    classes: Optional[List[int]] = Field(None, description="the global class id of each output, in output order; default: 0..outputs-1")
    tasks: Optional[List[List[int]]] = Field(None, description="its classes (global ids) grouped into tasks, one TSN each; default: one "
                                                               "task of its classes not claimed by an earlier teacher")
    name: Optional[str] = Field(None, description="a name for messages and brick provenance; default: teacher<i>")


class TeacherSet(nn.Module):
    """Several frozen teachers called on the same batch: a list of logits, one per teacher."""

    def __init__(self, teachers: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(teachers)
        self.task_names: List[str] = []

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [t(x) for t in self.members]

    def features(self, x: torch.Tensor) -> torch.Tensor:  # InfoMax=teacher with a single teacher
        return self.members[0].features(x)

    @property
    def net(self) -> nn.Module:
        return self.members[0].net


def load_teachers(entries: Sequence[TeacherEntry], ctx: MethodContext) -> Tuple[TeacherSet, List[List[int]]]:
    """The teachers of ``entries`` (frozen classifiers, each with its own label space) and, for each, the global class
    ids of its outputs (all its outputs' ids when ``classes`` is not given); bad entries raise one-line ConfigErrors."""
    teachers, teacher_classes = [], []
    n = ctx.train.num_classes
    for i, e in enumerate(entries):
        where = f"method.teachers[{i}]" if len(entries) > 1 or e.name else "method.teacher"
        spec = as_spec(e.path if isinstance(e.path, str) else e.path.model_dump(mode="json", exclude_defaults=True), where)
        net = load_network(spec, ctx, where)
        if net.task_names:
            raise ConfigError(f"{where}: a multi-head teacher ({net.task_names}) cannot be amalgamated; give one classifier")
        classes = e.classes if e.classes is not None else list(range(net.num_outputs))
        if len(classes) != net.num_outputs:
            raise ConfigError(f"{where}.classes lists {len(classes)} classes but the teacher has {net.num_outputs} outputs")
        bad = [c for c in classes if not 0 <= c < n]
        if bad or len(set(classes)) != len(classes):
            raise ConfigError(f"{where}.classes must be distinct class ids in 0..{n - 1} of the data, got {classes}")
        teacher_classes.append(list(classes))
        teachers.append(net)
    return TeacherSet(teachers), teacher_classes


def check_ckn_architecture(manifest: Dict[str, Any], ctx: MethodContext, where: str) -> None:
    """The frozen CKN must take this data, and ``model`` must say what it is (the run's card records it)."""
    arch = manifest["architecture"]
    got = (ctx.train.in_channels, ctx.train.image_size)
    if (arch.get("in_channels"), arch.get("image_size")) != got:
        raise ConfigError(f"{where}: the CKN brick takes inputs of {arch.get('in_channels')} channels at size {arch.get('image_size')}, "
                          f"the data have {got[0]} at size {got[1]}")
    model = ctx.cfg.model
    if model.name != arch["name"] or dict(model.kwargs) != dict(arch.get("kwargs", {})):
        raise ConfigError(f"model must be the CKN brick's architecture: set model: {{name: {arch['name']}, kwargs: {arch.get('kwargs', {})}}} "
                          f"(got {{name: {model.name}, kwargs: {dict(model.kwargs)}}})")


class _MultiTeacherKF(KnowledgeFactorization):
    """KF with teachers of their own label spaces (``entries``) and, with ``ckn_path``, a frozen CKN brick."""

    def __init__(self, params, ctx: MethodContext, entries: Sequence[TeacherEntry], ckn_path: Optional[str], where: str):
        chosen = set(params.model_fields_set)
        self.ckn_manifest = None
        if ckn_path is not None:
            if "infomax_weight" in chosen and params.infomax_weight:
                raise ConfigError(f"method.infomax_weight: the CKN brick is frozen, InfoMax (which trains the CKN) has nothing to train; "
                                  f"leave it unset or 0 ({where})")
            params = params.model_copy(update={"infomax_weight": 0.0})
            manifest, tensors = load_brick(ckn_path)
            if manifest["kind"] != "ckn":
                raise ConfigError(f"method.ckn: {ckn_path} is a {manifest['kind']} brick, not a CKN brick (ckn.json)")
            check_ckn_architecture(manifest, ctx, "method.ckn")
            self.ckn_manifest, self._ckn_tensors, self.ckn_path = manifest, tensors, Path(ckn_path)
            norm = manifest.get("normalize") or {}
            if ctx.transform is not None:  # the new TSNs must see inputs as the CKN did: its normalisation, not this data's
                ctx.transform.mean, ctx.transform.std = norm.get("mean"), norm.get("std")
        elif len(entries) > 1 and params.infomax == "teacher" and (params.infomax_weight is None or params.infomax_weight > 0):
            raise ConfigError("method.infomax=teacher matches one teacher's features with the CKN's; with several teachers use "
                              "method.infomax=views (the default of kf_amalgamate) or method.infomax_weight=0")
        self._entries = list(entries)
        self.teacher_names = [e.name or f"teacher{i}" for i, e in enumerate(entries)]
        self.teacher_classes: List[List[int]] = []
        tasks, owner = self._plan_tasks(ctx)
        ctx.tasks[:] = tasks  # the run's tasks (the engine evaluates and the bricks are named by them)
        self.task_teacher = owner
        super().__init__(params, ctx)
        if self.ckn_manifest is not None:
            for p in self.factors.ckn.parameters():
                p.requires_grad_(False)
            self.factors.ckn.eval()
        self._labels: Optional[torch.Tensor] = None
        self._plan_targets()

    # -- construction --

    def _plan_tasks(self, ctx: MethodContext) -> Tuple[List[Task], List[int]]:
        """The run's tasks and, for each, the index of the teacher that distils it."""
        n = ctx.train.num_classes
        if ctx.cfg.data.tasks is not None:  # tasks named in data.tasks: each goes to the first teacher that covers it
            if any(e.tasks is not None for e in self._entries):
                raise ConfigError("give the tasks either in data.tasks or per teacher (method.teachers[i].tasks), not both")
            tasks = list(ctx.tasks)
            if any(t.classes is None for t in tasks):
                raise ConfigError("amalgamation and extension need class tasks (data.tasks: split or partition), not latent tasks")
        else:
            parts, claimed = [], set()
            for i, e in enumerate(self._entries):
                if e.classes is None and len(self._entries) > 1:
                    raise ConfigError(f"method.teachers[{i}].classes: list the global class id of each of the teacher's outputs "
                                      "(needed with several teachers)")
                own = e.classes if e.classes is not None else list(range(n))
                if e.tasks is not None:
                    outside = sorted({c for t in e.tasks for c in t} - set(own))
                    if outside:
                        raise ConfigError(f"method.teachers[{i}].tasks: classes {outside} are not among the teacher's classes {own}")
                    parts += [list(t) for t in e.tasks]
                else:
                    left = [c for c in own if c not in claimed]
                    if left:
                        parts.append(left)
                claimed.update(c for p in parts for c in p)
            tasks = class_partition(parts, n)
        owners = []
        for t in tasks:
            for i, e in enumerate(self._entries):
                if e.classes is None or set(t.classes) <= set(e.classes):
                    owners.append(i)
                    break
            else:
                raise ConfigError(f"no teacher covers all classes of task {t.name} {list(t.classes)}; the teachers' classes are "
                                  f"{[e.classes for e in self._entries]}")
        return tasks, owners

    def _load_teacher(self, params, ctx: MethodContext) -> TeacherSet:
        teachers, self.teacher_classes = load_teachers(self._entries, ctx)
        return teachers

    def _build_ckn(self, ctx: MethodContext) -> nn.Module:
        if self.ckn_manifest is None:
            return super()._build_ckn(ctx)
        ckn = build_ckn(self.ckn_manifest["architecture"])
        load_state_into(ckn, self._ckn_tensors, f"CKN architecture in {self.ckn_path}")
        del self._ckn_tensors
        return ckn

    def _plan_targets(self) -> None:
        """Per task: (teacher index, its outputs of the task's classes, its other outputs, "other" output?, members)."""
        self._plan = []
        for task, k in zip(self.tasks, self.task_teacher):
            cls = self.teacher_classes[k]
            pos = {c: j for j, c in enumerate(cls)}
            inside = [pos[c] for c in task.classes]
            rest = [j for j, c in enumerate(cls) if c not in set(task.classes)]
            other = task_output_size(task, self.num_classes) > task.num_classes
            self._plan.append((k, inside, rest, other, torch.tensor(cls, dtype=torch.long)))

    # -- training --

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "ckn_manifest", None) is not None:
            self.factors.ckn.eval()  # frozen: its BatchNorm statistics stay as they were
        return self

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        self._labels = batch.y  # the gate of each teacher's targets (teacher_targets receives the teachers' outputs only)
        try:
            return super().training_step(batch)
        finally:
            self._labels = None

    def teacher_targets(self, out) -> List[torch.Tensor]:
        y = self._labels
        targets = []
        for k, inside, rest, other, cls in self._plan:
            logits = out[k]
            member = torch.isin(y, cls.to(y.device)) if y is not None else torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            targets.append(gated_targets(logits, member, inside, rest, self.params.temperature, other))
        return targets

    # -- output --

    def hooks(self):
        return [ExportLibraryBricks(self)]

    def report(self, exp, run_dir, baseline=None):
        return None  # the accuracy report (kf_report compares one teacher with its factors)


@METHODS.register("kf_amalgamate", tags=("factorization",))
class KFAmalgamation(_MultiTeacherKF):
    """Knowledge Factorization of several teachers (own label spaces) into one CKN and per-teacher-task TSNs."""

    class Config(KnowledgeFactorization.Config):
        teacher: Optional[NetworkSpec] = Field(None, description="not used: list the teachers in method.teachers")
        teachers: List[TeacherEntry] = Field(..., min_length=1, description="each: {path, classes, tasks, name}")
        ckn: Optional[str] = Field(None, description="a CKN brick (ckn.json) to amalgamate onto, kept frozen; default: train a new CKN")
        infomax: Literal["teacher", "views"] = Field("views", description="views: InfoNCE between two views through the CKN; teacher: "
                                                                        "only with a single teacher")

    def __init__(self, params: "KFAmalgamation.Config", ctx: MethodContext):
        if params.teacher is not None:
            raise ConfigError("method.teacher: kf_amalgamate takes method.teachers: [{path, classes}, ...]")
        super().__init__(params, ctx, params.teachers, params.ckn, "kf_amalgamate")


@METHODS.register("kf_extend", tags=("factorization",))
class KFExtension(_MultiTeacherKF):
    """New TSN bricks for a frozen CKN brick, from a new or the same teacher, on new classes or a new task."""

    class Config(KnowledgeFactorization.Config):
        ckn: str = Field(..., description="the CKN brick to extend (a run's bricks/ckn.json): loaded and kept frozen")
        teacher_classes: Optional[List[int]] = Field(None, description="the global class id of each teacher output; default: 0..outputs-1")

    def __init__(self, params: "KFExtension.Config", ctx: MethodContext):
        entry = TeacherEntry(path=params.teacher, classes=params.teacher_classes)
        super().__init__(params, ctx, [entry], params.ckn, "kf_extend")


def union_targets(outs: Sequence[torch.Tensor], classes: Sequence[torch.Tensor], y: torch.Tensor, num_classes: int,
                  temperature: float) -> torch.Tensor:
    """The multi-teacher KD target (the amalgamation's baseline), as logits over the union label space: each teacher's
    tempered softmax placed at its classes, for the samples whose label is among its classes (the same label gate as
    the TSN targets), averaged over the teachers that qualify; T * log of it (floored), so its softmax at T is it."""
    probs = outs[0].new_zeros(outs[0].shape[0], num_classes)
    count = outs[0].new_zeros(outs[0].shape[0], 1)
    for logits, cls in zip(outs, classes):
        cls = cls.to(logits.device)
        gate = torch.isin(y, cls).to(logits.dtype)[:, None]
        probs[:, cls] += gate * F.softmax(logits / temperature, dim=1)
        count += gate
    return temperature * (probs / count.clamp_min(1)).clamp_min(1e-30).log().clamp_min(LOG_FLOOR)


@METHODS.register("kd_amalgamate", tags=("distillation",))
class MultiTeacherKD(Method):
    """One student distilled from several teachers of their own label spaces (the baseline of kf_amalgamate):
    ``alpha * T^2 KL(union target || student) + (1 - alpha) CE``, the union target from :func:`union_targets`."""

    class Config(MethodParams):
        teachers: List[TeacherEntry] = Field(..., min_length=1, description="each: {path, classes}")
        temperature: float = Field(4.0, gt=0)
        alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs the CE term")

    def __init__(self, params: "MultiTeacherKD.Config", ctx: MethodContext):
        from ..supervised import build_network

        super().__init__()
        self.params, self.tasks, self.num_classes = params, ctx.tasks, ctx.train.num_classes
        if any(e.classes is None for e in params.teachers) and len(params.teachers) > 1:
            raise ConfigError("method.teachers[i].classes: list the global class id of each teacher's outputs")
        self.teacher, classes = load_teachers(params.teachers, ctx)
        self.teacher_classes = [torch.tensor(c, dtype=torch.long) for c in classes]
        self.net = build_network(ctx)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        p = self.params
        out = self.net(batch.x)
        target = union_targets(self.teacher(batch.x), self.teacher_classes, batch.y, self.num_classes, p.temperature)
        kd, ce = kd_loss(out, target, p.temperature), F.cross_entropy(out, batch.y)
        return {"loss": p.alpha * kd + (1 - p.alpha) * ce, "kd": kd.detach(), "ce": ce.detach()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.net(x)

    def export_module(self):
        return self.net


def _tsn_manifests(m: _MultiTeacherKF, ckn_manifest: Dict[str, Any], tsn_arch, class_names, metrics, provenance) -> List[Dict[str, Any]]:
    out = []
    for task, tsn, k in zip(m.tasks, m.factors.tsns, m.task_teacher):
        out.append({
            "kind": "tsn",
            "task": task.to_dict(),
            "class_names": [class_names[c] for c in task.classes],
            "num_outputs": tsn.head.out_features,
            "architecture": tsn_arch,
            "ckn_fingerprint": ckn_manifest["fingerprint"],
            "ckn_architecture": ckn_manifest["architecture"],
            "temperature": m.assembly_temperature,
            "normalize": ckn_manifest.get("normalize"),
            "num_classes_total": m.num_classes,
            "provenance": {**provenance, "teacher": provenance["teachers"][k]},
            "metrics": {"acc": metrics.get(f"acc_{task.name}")},
        })
    return out


class ExportLibraryBricks(Hook):
    """When training ends, write ``bricks/``: the CKN (a byte copy of the frozen brick, or the new one) and one TSN
    brick per task, bound to the CKN's fingerprint."""

    def __init__(self, method: _MultiTeacherKF):
        self.method = method

    def on_fit_end(self, trainer, summary) -> None:
        from ..._version import __version__
        from .bricks import export_bricks

        m, run_dir, card = self.method, Path(trainer.run_dir), trainer.card
        p, cfg = m.params, m.cfg
        out = run_dir / "bricks"
        out.mkdir(parents=True, exist_ok=True)
        tsn_arch = {"name": p.tsn.name, "kwargs": p.tsn.kwargs, "dim": p.tsn_dim, "combine": p.combine}
        teachers = [{"name": name, "spec": e.path if isinstance(e.path, str) else e.path.to_json(), "classes": cls,
                     "fingerprint": getattr(t, "card", {}).get("fingerprint")}
                    for name, e, cls, t in zip(m.teacher_names, m._entries, m.teacher_classes, m.teacher.members)]
        provenance = {"method": cfg.method.name, "teachers": teachers, "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed,
                      "run_dir": str(run_dir)}
        metrics = {k.split("/", 1)[1]: v for k, v in card["metrics"]["final"].items()}
        if m.ckn_manifest is None:
            ckn_arch = {"name": cfg.model.name, "kwargs": cfg.model.kwargs, **m.shape, "feature_dim": m.factors.ckn.feature_dim}
            paths = export_bricks(m.factors, [], out, ckn_arch, tsn_arch, m.num_classes, card["classes"], card["normalize"],
                                  provenance, metrics, temperature=m.assembly_temperature)
            ckn_manifest = json.loads(paths[0].read_text())
        else:  # the frozen CKN, copied byte for byte: the run directory holds every brick it assembles from
            src = m.ckn_path if m.ckn_path.suffix == ".json" else m.ckn_path.with_suffix(".json")
            ckn_manifest = m.ckn_manifest
            if src.resolve() != (out / "ckn.json").resolve():
                shutil.copyfile(src, out / "ckn.json")
                shutil.copyfile(src.parent / ckn_manifest["weights"], out / ckn_manifest["weights"])
        for manifest, task, tsn in zip(_tsn_manifests(m, ckn_manifest, tsn_arch, card["classes"], metrics, provenance), m.tasks, m.factors.tsns):
            _write(out / f"tsn-{task.name}", {**manifest, "kbricks": __version__}, tsn.state_dict())


__all__ = ["KFAmalgamation", "KFExtension", "MultiTeacherKD", "union_targets", "TeacherEntry", "TeacherSet", "gated_targets", "load_teachers"]

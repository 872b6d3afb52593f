"""What every method with a teacher (or SSKT's sources) needs: the frozen network fed the method's own inputs,
checked on one batch, and its features or head read with :class:`kbricks.models.taps.FeatureTap`.

    teacher = load_teacher(params.teacher, ctx)            # frozen, eval mode, converted inputs, label space checked
    logits = teacher(batch.x)                              # the method's (normalised) inputs
    z = teacher.features(batch.x)                          # the input of its head, found by execution
    teacher.probe_accuracy                                 # its accuracy on a labelled probe of the training data

A teacher shares the data's label space, so its accuracy on the training data tells whether it is fed the input
convention it was trained on (:func:`check_input_convention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..data.augment import channel_stats, channel_view
from ..errors import ConfigError
from ..models.adapter import InputAdapter
from ..models.frozen import FrozenNetwork, load_frozen, task_logits
from ..models.spec import NetworkRef, NetworkSpec, as_spec
from ..models.taps import FeatureTap, find_head
from .base import MethodContext

TEACHER_HELP = ("the trained teacher: a kbricks run directory or model.json, a torch.export (.pt2) or TorchScript file, "
                "{path: package.module:factory, kwargs, weights, normalize} or {path: timm:<name>, weights, normalize} (docs/byo.md); "
                "check: false skips the check of its input convention on the training data")

PROBE_SIZE = 512  # labelled training samples the teacher is scored on at load
PROBE_MIN = 32  # below this, the alternatives are not compared (too few samples to call one far better)
PROBE_BATCH = 64
MARGIN = 0.10  # an alternative convention must score this much more ...
ERROR_RATIO = 0.5  # ... and make at most this fraction of the stated convention's errors


def input_norm(ctx: MethodContext) -> Optional[Dict[str, Any]]:
    """How the method's inputs are normalised (None: the data as loaded)."""
    tf = getattr(ctx, "transform", None)
    return {"mean": tf.mean, "std": tf.std} if tf is not None and tf.mean is not None else None


def example_inputs(ctx: MethodContext, n: int = 2) -> torch.Tensor:
    """A few training inputs as the method sees them (normalised): a loaded network's dummy batch."""
    x = ctx.train.x[:n]
    tf = getattr(ctx, "transform", None)
    return tf(x, train=False) if tf is not None else x


def load_network(ref: NetworkRef, ctx: MethodContext, where: str) -> FrozenNetwork:
    """A frozen network fed the method's inputs, checked on one batch (any label space: an SSKT source)."""
    return load_frozen(ref, input_norm(ctx), example_inputs(ctx), where)


def load_teacher(spec: NetworkRef, ctx: MethodContext, where: str = "method.teacher") -> FrozenNetwork:
    """The frozen teacher, fed the method's inputs, checked on one batch, against the data's label space and (unless
    its spec says ``check: false``) for its input convention; ``teacher.probe_accuracy`` is its accuracy on a
    labelled probe of the training data."""
    spec = as_spec(spec, where)
    teacher = load_network(spec, ctx, where)
    check_teacher_outputs(teacher, ctx, f"{where} ({spec.describe()})")
    check_input_convention(teacher, ctx, f"{where} ({spec.describe()})", compare=spec.check)
    return teacher


def check_teacher_outputs(teacher: FrozenNetwork, ctx: MethodContext, where: str) -> None:
    """A teacher must speak the student's label space (SSKT is the method for foreign label spaces)."""
    if teacher.task_names:
        missing = [t.name for t in ctx.tasks if t.name not in teacher.task_names]
        if missing:
            raise ConfigError(f"teacher {where} has no heads for tasks {missing}; its heads are {teacher.task_names}")
    elif teacher.num_outputs != ctx.train.num_classes:
        raise ConfigError(
            f"teacher {where} predicts {teacher.num_outputs} classes but the data has {ctx.train.num_classes}; "
            "KD needs a shared label space (use method sskt for sources with other label spaces)"
        )


# ---- the input convention, checked on labelled training data ----------------------------------------------------


@dataclass
class Convention:
    """One way to feed the teacher: ``feed`` maps (inputs as loaded, the method's inputs) to the network's input."""

    name: str  # as shown: "as given", "standardised", ...
    feed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    fix: str  # what to set to use it


@dataclass
class ProbeResult:
    accuracy: float  # under the stated convention
    samples: int
    chance: float  # the most frequent class's share of the probe
    alternatives: Dict[str, float] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"accuracy": round(self.accuracy, 4), "samples": self.samples, "chance": round(self.chance, 4),
                **({"alternatives": {k: round(v, 4) for k, v in self.alternatives.items()}} if self.alternatives else {})}


def far_better(stated: float, alternative: float) -> bool:
    """The rule, in one place: a convention is far better than the stated one when it scores at least ``MARGIN``
    more on the probe and makes at most ``ERROR_RATIO`` of its errors (a teacher fed its own convention scores best
    on its own training data; an untrained teacher, at chance everywhere, never triggers it)."""
    return alternative - stated >= MARGIN and (1 - alternative) <= ERROR_RATIO * (1 - stated)


def _probe_indices(n: int) -> torch.Tensor:
    """A fixed random subset of the training set (the data may be sorted by class), independent of the run's RNG."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:PROBE_SIZE]


def _correct(out, y: torch.Tensor, latents: Optional[torch.Tensor], teacher: FrozenNetwork, tasks) -> torch.Tensor:
    """[hits, counted] of one batch: the argmax over all classes (one head), or each task's head on its own labels."""
    if isinstance(out, (list, tuple)):
        hits = counted = 0
        for task in tasks:
            labels = task.local_labels(y, latents)
            member = labels >= 0
            hits += int((task_logits(out, task, teacher.task_names).argmax(1) == labels)[member].sum())
            counted += int(member.sum())
        return torch.tensor([hits, counted])
    return torch.tensor([int((out.argmax(1) == y).sum()), int(y.numel())])


def _round(values: Sequence[float]) -> List[float]:
    return [float(f"{v:.4g}") for v in values]


def _norm_text(mean: Sequence[float], std: Sequence[float]) -> str:
    if len(mean) > 16:
        return (f"the per-feature mean and std of the training set ({len(mean)} values each: "
                "kbricks.data.augment.channel_stats(x_train))")
    return f"{{'mean': {_round(mean)}, 'std': {_round(std)}}}"


def _alternatives(teacher: FrozenNetwork, ctx: MethodContext, idx: torch.Tensor) -> List[Convention]:
    """The obvious conventions other than the stated one: the data as loaded, standardised with the training set's
    statistics, scaled to 0..255, and the other image layout (NHWC <-> NCHW)."""
    net_norm = getattr(teacher, "net_norm", None)
    device = teacher.adapter.net_mean.device
    as_loaded = InputAdapter(None, None, teacher.adapter.spec).to(device)  # the data as loaded, mapped as the spec says
    setting = "set teacher_normalize={} (method.teacher.normalize in YAML)"
    out: List[Convention] = []
    if net_norm is not None:
        out.append(Convention("as given", lambda raw, xm: as_loaded(raw), "remove teacher_normalize (set method.teacher.normalize: none)"))
    else:
        method_norm = input_norm(ctx)
        if method_norm is not None and teacher.adapter.spec.model_dump(exclude_defaults=True) == {}:
            mean, std = list(method_norm["mean"]), list(method_norm["std"])
        else:
            sample = torch.cat([as_loaded(ctx.train.x[idx[i:i + PROBE_BATCH]].to(device)).cpu() for i in range(0, len(idx), PROBE_BATCH)])
            mean, std = channel_stats(sample)
        out.append(Convention("standardised with the training set's mean/std",
                              lambda raw, xm: (as_loaded(raw) - channel_view(mean, raw)) / channel_view(std, raw),
                              setting.format(_norm_text(mean, std))))
    out.append(Convention("scaled to 0..255", lambda raw, xm: as_loaded(raw) * 255.0,
                          setting.format("{'mean': [0.0], 'std': [" + repr(1 / 255) + "]}")))
    if ctx.train.x.dim() == 4:
        out.append(Convention("read as NHWC [N, H, W, C]", lambda raw, xm: teacher.adapter(xm).permute(0, 3, 1, 2),
                              "the data are NHWC [N, H, W, C]: pass them as [N, C, H, W] (x.permute(0, 3, 1, 2))"))
        out.append(Convention("fed as NHWC [N, H, W, C]", lambda raw, xm: teacher.adapter(xm).permute(0, 2, 3, 1),
                              "the network takes NHWC inputs: wrap it to permute [N, C, H, W] inputs (x.permute(0, 2, 3, 1)) first"))
    return out


@torch.no_grad()
def probe_teacher(teacher: FrozenNetwork, ctx: MethodContext, compare: bool = True) -> tuple:
    """(ProbeResult, the far better convention or None): the teacher's accuracy on up to ``PROBE_SIZE`` labelled
    training samples as the method feeds it, and, with ``compare``, under each alternative convention."""
    train = ctx.train
    device = next((b.device for b in teacher.buffers()), torch.device("cpu"))
    idx = _probe_indices(len(train.y))
    tf = getattr(ctx, "transform", None)
    y, latents = train.y[idx], (train.latents[idx] if train.latents is not None else None)
    counts = torch.bincount(y[y >= 0]) if (y >= 0).any() else torch.ones(1)
    chance = float(counts.max()) / max(1, int(counts.sum()))

    def score(feed: Optional[Callable]) -> Optional[float]:
        total = torch.zeros(2, dtype=torch.long)
        for i in range(0, len(idx), PROBE_BATCH):
            j = idx[i:i + PROBE_BATCH]
            raw = train.x[j].to(device)
            xm = tf(raw, train=False) if tf is not None else raw
            out = teacher(xm) if feed is None else teacher.net(feed(raw, xm))
            out = [o.cpu() for o in out] if isinstance(out, (list, tuple)) else out.cpu()
            lat = latents[i:i + PROBE_BATCH] if latents is not None else None
            total += _correct(out, train.y[j], lat, teacher, ctx.tasks)
        return float(total[0]) / max(1, int(total[1]))

    result = ProbeResult(score(None), len(idx), chance)
    if not compare or len(idx) < PROBE_MIN or getattr(teacher, "source_kind", None) == "kbricks":
        return result, None  # a kbricks run records the convention it was trained with
    best: Optional[Convention] = None
    if result.accuracy < 1 - MARGIN:  # otherwise nothing can be far better
        for conv in _alternatives(teacher, ctx, idx):
            try:
                acc = score(conv.feed)
            except Exception:  # the network cannot take this convention's shape: not an alternative
                continue
            result.alternatives[conv.name] = acc
            if far_better(result.accuracy, acc) and (best is None or acc > result.alternatives[best.name]):
                best = conv
    return result, best


def check_input_convention(teacher: FrozenNetwork, ctx: MethodContext, where: str, compare: bool = True) -> None:
    """Scores the teacher on a labelled probe of the training data (kept as ``teacher.probe_accuracy``); a teacher
    that another obvious convention serves far better (:func:`far_better`) is refused in one line naming the fix."""
    device = getattr(ctx, "device", None) or torch.device("cpu")
    teacher.to(device)  # the probe runs where training will (a big teacher on CPU would take minutes)
    try:
        result, best = probe_teacher(teacher, ctx, compare)
    finally:
        teacher.to("cpu")
    teacher.probe_accuracy = result.accuracy
    teacher.probe = result.to_json()
    if best is not None:
        stated = "normalize: none" if getattr(teacher, "net_norm", None) is None else "its stated normalize"
        raise ConfigError(
            f"teacher {where} scores {100 * result.accuracy:.1f} % on {result.samples} training samples as fed ({stated}) "
            f"but {100 * result.alternatives[best.name]:.1f} % {best.name}: {best.fix}; "
            "check_teacher=False (method.teacher.check: false) skips this check")


__all__ = ["TEACHER_HELP", "FeatureTap", "FrozenNetwork", "NetworkSpec", "ProbeResult", "check_input_convention",
           "check_teacher_outputs", "example_inputs", "far_better", "find_head", "input_norm", "load_network",
           "load_teacher", "probe_teacher", "task_logits"]

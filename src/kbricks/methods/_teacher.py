"""What every method with a teacher (or SSKT's sources) needs: the frozen network fed the method's own inputs,
checked on one batch, and its features or head read with :class:`kbricks.models.taps.FeatureTap`.

    teacher = load_teacher(params.teacher, ctx)            # frozen, eval mode, converted inputs, label space checked
    logits = teacher(batch.x)                              # the method's (normalised) inputs
    z = teacher.features(batch.x)                          # the input of its head, found by execution
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..errors import ConfigError
from ..models.frozen import FrozenNetwork, load_frozen, task_logits
from ..models.spec import NetworkRef, NetworkSpec, as_spec
from ..models.taps import FeatureTap, find_head
from .base import MethodContext

TEACHER_HELP = ("the trained teacher: a kbricks run directory or model.json, a TorchScript file, "
                "{path: package.module:factory, kwargs, weights, normalize} or {path: timm:<name>, weights, normalize} (docs/byo.md)")


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
    """The frozen teacher, fed the method's inputs, checked on one batch and against the data's label space."""
    spec = as_spec(spec, where)
    teacher = load_network(spec, ctx, where)
    check_teacher_outputs(teacher, ctx, f"{where} ({spec.describe()})")
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


__all__ = ["TEACHER_HELP", "FeatureTap", "FrozenNetwork", "NetworkSpec", "check_teacher_outputs", "example_inputs",
           "find_head", "input_norm", "load_network", "load_teacher", "task_logits"]

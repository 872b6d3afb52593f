"""Method API: a thin ``nn.Module`` whose ``training_step`` returns a dict of named losses.

``loss`` in that dict is what is optimised; the other entries are logged. ``predict`` gives eval logits
(one tensor over the dataset's classes, or a list with one tensor per task for multi-head models).

The engine knows no method by name; a method speaks to it through these hooks:

* ``hooks()``: extra run hooks (e.g. KF writes its bricks when training ends);
* ``card()``: fields added to (or replacing) the model card's (e.g. KF: ``network: factors``);
* ``report(exp, run_dir, baseline)``: its own ``kbricks evaluate`` report instead of the accuracy evaluation.

``describe_options(Method.Config)`` lists a method's options (``kbricks options METHOD``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..config import RunConfig
from ..core.hooks import Hook
from ..data import ArrayDataset, BatchAugment, Task, TaskData
from ..registry import Registry

METHODS = Registry("method", "kbricks.methods")


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    latents: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    raw: Optional[torch.Tensor] = None  # the un-augmented [0, 1] images, for methods that draw extra views


@dataclass
class MethodContext:
    """What a method needs to build itself: the run config, training data and tasks (plus, for continual runs,
    the scenario's task sequence)."""

    cfg: RunConfig
    train: ArrayDataset
    tasks: List[Task]
    device: torch.device
    transform: Optional[BatchAugment] = None  # the run's BatchAugment (normalisation statistics, extra views)
    scenario: Optional[List[TaskData]] = None


Prediction = Union[torch.Tensor, List[torch.Tensor]]


class Method(nn.Module):
    Config = MethodParams

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        # DDP hooks forward(), so training goes through it
        return self.training_step(batch)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Prediction:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def export_module(self) -> nn.Module:
        """The network to ship after training (auxiliary parts dropped)."""
        return self

    def teacher_probe(self) -> Optional[Dict]:
        """The teacher's accuracy on a labelled probe of the training data, as measured at load (``{accuracy, samples,
        chance, alternatives}``), for the run summary; None for a method without a teacher."""
        return getattr(getattr(self, "teacher", None), "probe", None) or None

    def hooks(self) -> List[Hook]:
        """Extra hooks this method adds to its run (artefacts, reports). Default: none."""
        return []

    def card(self) -> Dict[str, Any]:
        """Fields this method adds to the run's model card (model.json), or replaces (e.g. ``network``: what the
        weights rebuild). Default: none."""
        return {}

    def report(self, exp, run_dir, baseline=None) -> Optional[Dict]:
        """A method's own evaluation report for ``kbricks evaluate`` (``exp`` holds the loaded run). ``None``: the
        engine's accuracy evaluation is the report."""
        return None


def describe_options(config: type, prefix: str = "") -> List[Dict[str, str]]:
    """One entry per option of a pydantic Config: ``name``, ``type``, ``default`` (``required`` when there is none),
    ``constraints`` and ``description``, in declaration order."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, f in config.model_fields.items():
        if f.default is not PydanticUndefined:
            default = _show(f.default)
        elif f.default_factory is not None:
            default = _show(f.default_factory())
        else:
            default = "required"
        bounds = [f"{sym} {getattr(m, attr)}" for m in f.metadata for attr, sym in
                  (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")) if getattr(m, attr, None) is not None]
        out.append({"name": prefix + name, "type": _type_name(f.annotation), "default": default, "constraints": ", ".join(bounds),
                    "description": f.description or ""})
    return out


def _show(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    import json

    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _type_name(annotation: Any) -> str:
    """A readable type: ``int``, ``float | None``, ``one of 'a', 'b'``, ``list[int]``, a model's class name."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or type(annotation).__name__ == "UnionType":
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", str(origin))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def list_methods(pattern: str = "*", tag: Optional[str] = None) -> List[str]:
    return METHODS.names(pattern, tag)

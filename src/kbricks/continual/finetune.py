"""The dense fine-tuning baseline: one ordinary network (every weight trainable, BatchNorm statistics shared) trained
on each task in turn with the run's ``optim``; the template's defaults as they are, no plugin. With ``head: shared``
(the default) nothing is stored per task, so learning a task overwrites what the earlier ones needed: the forgetting
the supermask strategies avoid by construction. ``head: per_task`` keeps one head per task (task-incremental),
``head: union`` one head over every class (class-incremental)."""

from __future__ import annotations

from ..methods.base import METHODS
from .strategy import ContinualStrategy


@METHODS.register("finetune", tags=("continual",))
class Finetune(ContinualStrategy):
    pass

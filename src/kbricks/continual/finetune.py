"""The dense fine-tuning baseline: one ordinary network (every weight trainable, BatchNorm statistics shared) trained
on each task in turn with the run's ``optim``. Nothing is stored per task, so learning a task overwrites what the
earlier ones needed: the forgetting the supermask strategies avoid by construction."""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

from ..methods.base import METHODS
from ..models import count_parameters
from ..models.masked import MaskSource
from .strategy import ContinualParams, ContinualStrategy, Stage


@METHODS.register("finetune", tags=("continual",))
class Finetune(ContinualStrategy):
    Config = ContinualParams
    masked = False

    def make_network(self, body: nn.Module) -> nn.Module:
        return body  # initialised from the run seed (build_experiment seeds torch first)

    def stages(self, t: int) -> List[Stage]:
        return [Stage("finetune", t, self.cfg.optim, self.cfg.train.epochs)]

    def begin_stage(self, stage: Stage) -> List[nn.Parameter]:
        self.stage = stage
        return [p for p in self.net.parameters() if p.requires_grad]

    def training_source(self) -> Optional[MaskSource]:
        return None

    def task_source(self, t: int) -> Optional[MaskSource]:
        return None

    def task_logits(self, x, source, t):
        return self.net(x)

    def per_task_storage(self) -> Dict[str, object]:
        return {"entries": 0.0, "bytes": 0.0, "what": "nothing (one shared dense network)"}

    def summary(self) -> Dict[str, object]:
        return {"shared_params": count_parameters(self.net)}

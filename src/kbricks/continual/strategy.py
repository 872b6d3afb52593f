"""The continual strategy template: a frozen supermask network plus per-task state, driven task by task by the
engine's task loop (``kbricks.engine.continual``) through named lifecycle steps:

    before_task(t)
    for stage in stages(t):              # e.g. SupSup: [mask]; ImpressLearn: [impression..., alpha]
        params = begin_stage(stage)      # what this stage optimises (fresh scores, coefficients)
        ... the engine's Loop trains training_step on stage.task's data ...
        end_stage(stage)                 # freeze what was learned (store the mask, keep the coefficients)
    after_task(t)
    evaluate every seen task with predict_task(x, j)

A strategy never runs an optimisation loop itself, and the network's mask is chosen per call
(``with net.using(source, task)``), never left switched on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import OptimConfig
from ..methods.base import Batch, Method, MethodContext, MethodParams
from ..models import create_model
from ..models.masked import MaskSource, SupermaskNet, supermask


@dataclass
class Stage:
    """One optimisation phase inside a task: its name, whose training data (and BatchNorm slot) it uses, its
    optimiser and its length in epochs."""

    name: str
    task: int
    optim: OptimConfig
    epochs: int
    index: int = 0  # e.g. which impression


class StrategyParams(MethodParams):
    density: float = Field(0.5, gt=0, le=1, description="fraction of weights each mask keeps (edge-popup's k)")


class ContinualStrategy(Method):
    Config = StrategyParams

    def __init__(self, params: StrategyParams, ctx: MethodContext):
        super().__init__()
        if not ctx.scenario:
            raise ValueError("a continual strategy needs a scenario (data.scenario)")
        self.params, self.cfg = params, ctx.cfg
        self.task_classes = [t.num_classes for t in ctx.scenario]
        train = ctx.scenario[0].train
        body = create_model(ctx.cfg.model.name, num_classes=max(self.task_classes), in_channels=train.in_channels,
                            image_size=train.image_size, **ctx.cfg.model.kwargs)
        self.net: SupermaskNet = supermask(body, params.density, seed=ctx.cfg.seed)
        self.task = 0
        self.stage: Optional[Stage] = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    # ---- lifecycle (called by the engine) ------------------------------------------------------------------
    def before_task(self, t: int) -> None:
        self.task = t

    def stages(self, t: int) -> List[Stage]:  # pragma: no cover - abstract
        raise NotImplementedError

    def begin_stage(self, stage: Stage) -> List[nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_stage(self, stage: Stage) -> None:
        self.stage = None

    def after_task(self, t: int) -> None:
        pass

    # ---- training ------------------------------------------------------------------------------------------
    def training_source(self) -> MaskSource:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        with self.net.using(self.training_source(), task=self.stage.task):
            ce = F.cross_entropy(self.net(batch.x), batch.y)
        reg = self.regulariser()
        if reg is None:
            return {"loss": ce, "ce": ce.detach()}
        return {"loss": ce + reg, "ce": ce.detach(), "reg": reg.detach()}

    def regulariser(self) -> Optional[torch.Tensor]:
        return None

    # ---- evaluation ----------------------------------------------------------------------------------------
    def task_source(self, t: int) -> MaskSource:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_coefficients(self) -> Optional[torch.Tensor]:
        """Every learned task as coefficients over the stored masks, [T, layers, masks]; ``None`` when task t is
        stored mask t (SupSup). Task inference works on this representation."""
        return None

    @torch.no_grad()
    def predict_task(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Logits for task ``t`` (its own classes first). Call ``eval()`` first for evaluation statistics."""
        with self.net.using(self.task_source(t), task=t):
            return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.predict_task(x, self.task)

    def per_task_storage(self) -> Dict[str, object]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bn_bytes_per_task(self) -> int:
        return 4 * self.net.bn_values_per_task()

    def generator(self, *parts: int) -> torch.Generator:
        from ..core.seeding import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, *parts))

"""SupSup (Wortsman et al. 2020): one edge-popup mask per task on a frozen random network; task t is stored mask t.

Each task trains fresh scores (top-``density`` |score| with a straight-through gradient, as in edge-popup) with the
run's optimiser (``optim``; the official MNIST recipe is RMSprop lr 1e-4 for ~1000 steps, the shipped default),
then stores the mask packed, 1 bit per weight. Nothing shared changes, so earlier tasks cannot be forgotten.
Evaluating task t unpacks its own mask only: the cost does not depend on how many masks are stored.
"""

from __future__ import annotations

from typing import Dict, List

from torch import nn

from ..methods.base import METHODS
from ..models.masked import MaskSource, ScoreMasks, StoredMask
from .strategy import Stage, SupermaskStrategy


@METHODS.register("supsup", tags=("continual",))
class SupSup(SupermaskStrategy):
    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.scores = nn.ParameterList()

    def stages(self, t: int) -> List[Stage]:
        return [Stage("mask", t, self.cfg.optim, self.cfg.train.epochs)]

    def begin_stage(self, stage: Stage) -> List[nn.Parameter]:
        self.stage = stage
        self.scores = nn.ParameterList(self.net.new_scores(self.generator(stage.task, 0)))
        return list(self.scores)

    def training_source(self) -> MaskSource:
        return ScoreMasks(list(self.scores), self.net.density)

    def end_stage(self, stage: Stage) -> None:
        slot = self.net.store_scores(list(self.scores))
        if slot != stage.task:
            raise RuntimeError(f"mask slot {slot} != task {stage.task}")
        self.scores = nn.ParameterList()
        super().end_stage(stage)

    def task_source(self, t: int) -> MaskSource:
        return StoredMask(t)

    def per_task_storage(self) -> Dict[str, object]:
        return {"entries": float(self.net.weights_per_mask()), "bytes": float(self.net.mask_bytes() + self.bn_bytes_per_task()),
                "what": "mask bits (1 per weight, packed)" + (" + BatchNorm statistics" if self.bn_bytes_per_task() else "")}

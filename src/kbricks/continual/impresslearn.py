"""ImpressLearn (Bhardwaj et al. 2022): k masks ("impressions") are learned once; every task is then only a
linear combination of them, one coefficient vector of length k per masked layer:

    mask_l(task t) = sum_i alpha[t, l, i] M_{l,i},   trained with CE + reg * sum_l (||alpha[t, l]||_1 - 1)^2

Impressions are heterogeneous (the masks of the first tasks), homogeneous (several masks of task 0, each with its
own score initialisation and data order) or random (Bernoulli(density) masks).
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import OptimConfig
from ..methods.base import METHODS
from ..models.masked import CachedWeights, Combination, MaskSource, ScoreMasks
from .strategy import ContinualStrategy, Stage, StrategyParams


def alpha_regulariser(alpha: torch.Tensor) -> torch.Tensor:
    """sum over layers of (||alpha_l||_1 - 1)^2: keeps the combined mask on the scale of one mask."""
    return ((alpha.abs().sum(1) - 1.0) ** 2).sum()


@METHODS.register("impresslearn", tags=("continual",))
class ImpressLearn(ContinualStrategy):
    class Config(StrategyParams):
        impressions: int = Field(5, ge=1, description="k, the number of impression masks")
        source: Literal["heterogeneous", "homogeneous", "random"] = Field(
            "heterogeneous", description="masks of the first tasks / several masks of task 0 / Bernoulli masks")
        per_task: int = Field(1, ge=1, description="heterogeneous: impressions learned on each source task")
        reg: float = Field(0.005, ge=0, description="weight of sum_l (||alpha_l||_1 - 1)^2")
        alpha_optim: OptimConfig = Field(default_factory=lambda: OptimConfig(name="adam", lr=0.05, weight_decay=0.0, schedule="constant"),
                                         description="optimiser of the coefficients")
        alpha_epochs: Optional[int] = Field(None, ge=1, description="epochs of coefficient training (default: train.epochs)")

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.scores = nn.ParameterList()
        self.alpha: Optional[nn.Parameter] = None
        self.alphas: Dict[int, torch.Tensor] = {}  # task -> [layers, k at the time]
        self._cached = None  # ((task, masks stored), FixedMasks) of the last evaluated task

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def before_task(self, t: int) -> None:
        super().before_task(t)
        if self.params.source == "random" and self.net.num_stored() == 0:
            for j in range(self.params.impressions):
                g = self.generator(0, j, 11)
                self.net.store([torch.rand(layer.weight.shape, generator=g).to(layer.weight.device) < self.net.density
                                for layer in self.net.masked_layers()])

    def stages(self, t: int) -> List[Stage]:
        p, have = self.params, self.net.num_stored()
        missing = p.impressions - have
        count = 0
        if missing > 0 and p.source == "homogeneous":
            count = missing
        elif missing > 0 and p.source == "heterogeneous":
            count = min(p.per_task, missing)
        out = [Stage("impression", t, self.cfg.optim, self.cfg.train.epochs, index=have + j) for j in range(count)]
        return out + [Stage("alpha", t, p.alpha_optim, p.alpha_epochs or self.cfg.train.epochs)]

    def begin_stage(self, stage: Stage) -> List[nn.Parameter]:
        self.stage = stage
        if stage.name == "impression":
            self.scores = nn.ParameterList(self.net.new_scores(self.generator(stage.task, stage.index, 7)))
            return list(self.scores)
        k, layers = self.net.num_stored(), len(self.net.masked_layers())
        self.alpha = nn.Parameter(torch.full((layers, k), 1.0 / k, device=self.net.masked_layers()[0].weight.device))
        return [self.alpha]

    def end_stage(self, stage: Stage) -> None:
        if stage.name == "impression":
            self.net.store_scores(list(self.scores))
            self.scores = nn.ParameterList()
        else:
            self.alphas[stage.task] = self.alpha.detach().clone()
            self.alpha = None
        super().end_stage(stage)

    # ---- training ------------------------------------------------------------------------------------------
    def training_source(self) -> MaskSource:
        if self.stage.name == "impression":
            return ScoreMasks(list(self.scores), self.net.density)
        return Combination(self.alpha)

    def regulariser(self) -> Optional[torch.Tensor]:
        if self.stage.name != "alpha":
            return None
        return self.params.reg * alpha_regulariser(self.alpha)

    # ---- evaluation ----------------------------------------------------------------------------------------
    def coefficients(self, t: int) -> torch.Tensor:
        """Task t's [layers, K] coefficients over all stored masks (impressions learned later get weight 0)."""
        a = self.alphas[t]
        return F.pad(a, (0, self.net.num_stored() - a.shape[1]))

    def task_source(self, t: int) -> MaskSource:
        """Task t's combined masks, computed once (k x N per layer) and kept while t is evaluated: every further
        batch is a plain masked forward, whatever the number of tasks."""
        key = (t, self.net.num_stored())
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, CachedWeights(self.net, Combination(self.coefficients(t))))
        return self._cached[1]

    def task_coefficients(self) -> Optional[torch.Tensor]:
        return torch.stack([self.coefficients(t) for t in sorted(self.alphas)])

    def per_task_storage(self) -> Dict[str, object]:
        entries = len(self.net.masked_layers()) * self.params.impressions
        return {"entries": float(entries), "bytes": 4.0 * entries + self.bn_bytes_per_task(), "what": "fp32 coefficients (k per masked layer)"}

    def get_extra_state(self):
        return {f"alpha_{t}": a for t, a in self.alphas.items()}

    def set_extra_state(self, state) -> None:
        self.alphas = {int(k.split("_")[1]): v for k, v in state.items() if k.startswith("alpha_")}
        self._cached = None

"""SupSup (Wortsman et al. 2020) and ImpressLearn (Bhardwaj et al. 2022) on a frozen random supermask network.

SupSup learns one binary mask per task. ImpressLearn learns a few masks ("impressions") and then represents
every task by real coefficients over them, one vector of length k per masked layer. Either way a task is a set
of per-layer coefficient vectors over the stored masks (one-hot for SupSup), which is all evaluation and task
inference need.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..models.masked import SupermaskNet
from ..registry import Registry

CL_METHODS = Registry("continual method")

# fit(params, loss_fn, lr, steps) -> runs the optimisation loop over the current task's data
Fit = Callable[[List[torch.Tensor], Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]], float, int], None]


class CLParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def mask_loss(net: SupermaskNet):
    def loss(x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        ce = F.cross_entropy(net(x), y)
        return {"loss": ce, "ce": ce.detach()}

    return loss


def alpha_regulariser(alphas: List[torch.Tensor]) -> torch.Tensor:
    """sum over layers of (||alpha_l||_1 - 1)^2: keeps the combined mask on the scale of one mask."""
    return torch.stack([(a.abs().sum() - 1.0) ** 2 for a in alphas]).sum()


class ContinualMethod:
    Config = CLParams
    name = "base"

    def __init__(self, params, net: SupermaskNet, seed: int):
        self.params, self.net, self.seed = params, net, seed

    def learn_task(self, t: int, fit: Fit, lr: float, steps: int, **kwargs) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_alphas(self, t: int) -> List[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def per_task_storage(self) -> Dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state(self) -> Dict[str, torch.Tensor]:
        return {}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        pass

    def generator(self, *parts: int) -> torch.Generator:
        from ..utils import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.seed, *parts))

    def bn_stats_per_task(self) -> int:
        from ..models.masked import TaskBatchNorm

        return sum(2 * m.running_mean.shape[1] for m in self.net.modules() if isinstance(m, TaskBatchNorm))


@CL_METHODS.register("supsup")
class SupSup(ContinualMethod):
    """One edge-popup mask per task; task t's coefficients are the one-hot vector e_t in every layer."""

    name = "supsup"

    def learn_task(self, t: int, fit: Fit, lr: float, steps: int, **_: object) -> None:
        self.net.set_bn_slot(t)
        scores = self.net.use_scores(self.generator(t, 0))
        fit(scores, mask_loss(self.net), lr, steps)
        slot = self.net.store_scores_as_masks()
        assert slot == t, f"mask slot {slot} != task {t}"

    def task_alphas(self, t: int) -> List[torch.Tensor]:
        one_hot = F.one_hot(torch.tensor(t), self.net.num_stored()).float()
        return [one_hot] * len(self.net.masked_layers())

    def per_task_storage(self) -> Dict[str, float]:
        bits = self.net.weights_per_mask()
        bn = self.bn_stats_per_task()
        return {"entries": float(bits), "bytes": bits / 8 + 4 * bn, "what": "mask bits (1 per weight)"}


@CL_METHODS.register("impresslearn")
class ImpressLearn(ContinualMethod):
    """k impressions, then per task only k coefficients per masked layer: mask_l = sum_i alpha_{l,i} M_{i,l}."""

    name = "impresslearn"

    class Config(CLParams):
        impressions: int = Field(5, ge=1, description="k, the number of impression masks")
        source: Literal["heterogeneous", "homogeneous", "random"] = Field(
            "heterogeneous", description="masks of the first tasks / several seeds of task 0 / Bernoulli masks")
        per_task: int = Field(1, ge=1, description="heterogeneous: impressions learned on each source task")
        reg: float = Field(0.005, ge=0, description="weight of sum_l (||alpha_l||_1 - 1)^2")

    def __init__(self, params, net: SupermaskNet, seed: int):
        super().__init__(params, net, seed)
        self.alphas: Dict[int, torch.Tensor] = {}  # task -> [L, k]

    def _learn_impressions(self, t: int, count: int, fit: Fit, lr: float, steps: int) -> None:
        for j in range(count):
            if self.net.num_stored() >= self.params.impressions:
                return
            scores = self.net.use_scores(self.generator(t, j, 7))
            fit(scores, mask_loss(self.net), lr, steps)
            self.net.store_scores_as_masks()

    def _random_impressions(self) -> None:
        for j in range(self.params.impressions):
            g = self.generator(0, j, 11)
            for layer in self.net.masked_layers():
                layer.store_mask(torch.rand(layer.weight.shape, generator=g) < self.net.density)

    def learn_task(self, t: int, fit: Fit, lr: float, steps: int, alpha_lr: float = 0.05, alpha_steps: Optional[int] = None) -> None:
        p = self.params
        self.net.set_bn_slot(t)
        if self.net.num_stored() < p.impressions:
            if p.source == "random":
                self._random_impressions()
            elif p.source == "homogeneous":
                self._learn_impressions(t, p.impressions, fit, lr, steps)
            else:
                self._learn_impressions(t, p.per_task, fit, lr, steps)
        k = self.net.num_stored()
        layers = len(self.net.masked_layers())
        alpha = torch.full((layers, k), 1.0 / k, requires_grad=True)

        def loss(x, y):
            self.net.use_alpha(list(alpha.unbind(0)))
            ce = F.cross_entropy(self.net(x), y)
            reg = alpha_regulariser(list(alpha.unbind(0)))
            return {"loss": ce + p.reg * reg, "ce": ce.detach(), "reg": reg.detach()}

        fit([alpha], loss, alpha_lr, alpha_steps or steps)
        self.net.release()
        self.alphas[t] = alpha.detach().clone()

    def task_alphas(self, t: int) -> List[torch.Tensor]:
        a = self.alphas[t]
        if a.shape[1] < self.net.num_stored():  # learned before later impressions existed: they get weight 0
            a = F.pad(a, (0, self.net.num_stored() - a.shape[1]))
        return list(a.unbind(0))

    def per_task_storage(self) -> Dict[str, float]:
        entries = len(self.net.masked_layers()) * self.params.impressions
        return {"entries": float(entries), "bytes": 4.0 * entries + 4 * self.bn_stats_per_task(), "what": "fp32 coefficients (k per masked layer)"}

    def state(self) -> Dict[str, torch.Tensor]:
        return {f"alpha_{t}": a for t, a in self.alphas.items()}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        self.alphas = {int(k.split("_")[1]): v for k, v in state.items() if k.startswith("alpha_")}

"""The continual strategy template: a network plus per-task state, driven task by task by the engine's task loop
(``kbricks.engine.continual``) through named lifecycle steps:

    before_task(t)
    for stage in stages(t):              # e.g. SupSup: [mask]; ImpressLearn: [impression..., alpha]
        params = begin_stage(stage)      # what this stage optimises (fresh scores, coefficients)
        ... the engine's Loop trains training_step on stage.task's data ...
        end_stage(stage)                 # freeze what was learned (store the mask, keep the coefficients)
    after_task(t)
    evaluate every seen task with predict_task(x, j)

A strategy never runs an optimisation loop itself. For supermask strategies the network's mask is chosen per call
(``with net.using(source, task)``), never left switched on. The engine switches the module to train mode at the
start of every epoch and to eval mode for evaluation, so every task's BatchNorm slot is estimated by that task's
own training (``tests/test_continual_bn.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import OptimConfig
from ..methods.base import Batch, Method, MethodContext, MethodParams
from ..models import create_model
from ..models.masked import MaskSource, SupermaskNet
from ..models.supermask import supermask


@dataclass
class Stage:
    """One optimisation phase inside a task: its name, whose training data (and BatchNorm slot) it uses, its
    optimiser and its length in epochs."""

    name: str
    task: int
    optim: OptimConfig
    epochs: int
    index: int = 0  # e.g. which impression


class ContinualParams(MethodParams):
    outputs: Optional[int] = Field(
        None, ge=1, description="superfluous-neuron head (SupSup's GNu setting): the network gets this many outputs, more than "
        "any task has classes; training pushes the extra logits down and task inference's G objective reads them")


class StrategyParams(ContinualParams):
    density: float = Field(0.5, gt=0, le=1, description="fraction of weights each mask keeps (edge-popup's k)")
    batchnorm: Literal["per_task", "shared"] = Field(
        "per_task", description="BatchNorm running statistics per task, or one set shared by every task (SupSup issue #11's "
        "failure mode, kept as an ablation: shared statistics make earlier tasks forget)")


class ContinualStrategy(Method):
    Config = StrategyParams
    masked = True  # a frozen supermask network (False: a dense network, e.g. the fine-tuning baseline)

    def __init__(self, params: ContinualParams, ctx: MethodContext):
        super().__init__()
        if not ctx.scenario:
            raise ValueError("a continual strategy needs a scenario (data.scenario)")
        self.params, self.cfg = params, ctx.cfg
        self.task_classes = [t.num_classes for t in ctx.scenario]
        self.scenario, self.transform, self.device = ctx.scenario, ctx.transform, ctx.device
        train = ctx.scenario[0].train
        outputs = max(self.task_classes)
        if params.outputs is not None:
            if params.outputs < outputs:
                from ..errors import ConfigError

                raise ConfigError(f"method.outputs={params.outputs} is smaller than the largest task ({outputs} classes)")
            outputs = params.outputs
        self.num_outputs = outputs
        body = create_model(ctx.cfg.model.name, num_classes=outputs, in_channels=train.in_channels,
                            image_size=train.image_size, **ctx.cfg.model.kwargs)
        self.net = self.make_network(body)
        self.task = 0
        self.stage: Optional[Stage] = None

    def make_network(self, body: nn.Module) -> nn.Module:
        return supermask(body, self.params.density, seed=self.cfg.seed)

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    def bn_slot(self, t: int) -> int:
        """Which BatchNorm statistics task ``t`` uses."""
        return 0 if getattr(self.params, "batchnorm", "per_task") == "shared" else t

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

    def stage_label(self, stage: Stage) -> str:
        """How progress lines name a stage of the task loop."""
        return stage.name

    def evaluated_after(self, t: int) -> bool:
        """Whether the seen tasks are evaluated after task t (False inside a block of tasks learned as a unit, e.g.
        ImpressLearn's seed phase: their accuracy-matrix row is empty)."""
        return True

    # ---- training ------------------------------------------------------------------------------------------
    def training_source(self) -> Optional[MaskSource]:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_logits(self, x: torch.Tensor, source: Optional[MaskSource], t: int) -> torch.Tensor:
        """The network's output on ``x`` with ``source``'s masks and task ``t``'s BatchNorm statistics."""
        with self.net.using(source, task=self.bn_slot(t)):
            return self.net(x)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        # every output is trained: with a superfluous-neuron head the extra logits are pushed down (SupSup GNu)
        ce = F.cross_entropy(self.task_logits(batch.x, self.training_source(), self.stage.task), batch.y)
        reg = self.regulariser()
        if reg is None:
            return {"loss": ce, "ce": ce.detach()}
        return {"loss": ce + reg, "ce": ce.detach(), "reg": reg.detach()}

    def regulariser(self) -> Optional[torch.Tensor]:
        return None

    # ---- evaluation ----------------------------------------------------------------------------------------
    def task_source(self, t: int) -> Optional[MaskSource]:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_coefficients(self) -> Optional[torch.Tensor]:
        """Every learned task as coefficients over the stored masks, [T, layers, masks]; ``None`` when task t is
        stored mask t (SupSup). Task inference works on this representation."""
        return None

    def supports_task_inference(self) -> bool:
        return self.masked

    @torch.no_grad()
    def predict_task(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Logits for task ``t`` (its own classes first). Call ``eval()`` first for evaluation statistics."""
        return self.task_logits(x, self.task_source(t), t)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.predict_task(x, self.task)

    @torch.no_grad()
    def score_sources(self, sources: Sequence[MaskSource], t: int, limit: int = 4096) -> List[Tuple[float, float]]:
        """(accuracy, mean cross-entropy) of each mask source on the first ``limit`` training images of task ``t``,
        BatchNorm on each batch's own statistics (nothing stored changes): the same fixed images for every source."""
        data = self.scenario[t].train
        n = min(limit, len(data))
        x = self.transform(data.x[:n].to(self.device), train=False)
        y = data.y[:n].to(self.device)
        bs = self.cfg.train.eval_batch_size
        out = []
        with self.net.batch_statistics():
            for src in sources:
                right, ce = 0, 0.0
                for i in range(0, n, bs):
                    logits = self.task_logits(x[i:i + bs], src, t)
                    right += int((logits[:, : self.task_classes[t]].argmax(1) == y[i:i + bs]).sum())
                    ce += float(F.cross_entropy(logits, y[i:i + bs], reduction="sum"))
                out.append((right / n, ce / n))
        return out

    @torch.no_grad()
    def calibrate_batchnorm(self, source: MaskSource, t: int, limit: int = 4096) -> None:
        """Re-estimate task ``t``'s BatchNorm statistics under ``source`` from its training images."""
        if not self.masked or not self.net.has_task_batchnorm():
            return
        data = self.scenario[t].train
        n = min(limit, len(data))
        bs = self.cfg.train.batch_size
        with self.net.calibrating(self.bn_slot(t)):
            for i in range(0, n - bs + 1, bs):
                self.task_logits(self.transform(data.x[i:i + bs].to(self.device), train=False), source, t)

    def per_task_storage(self) -> Dict[str, object]:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self) -> Dict[str, object]:
        """What the run's results record about the stored state (besides ``per_task_storage``)."""
        return {"weights_per_mask": self.net.weights_per_mask(), "stored_masks": self.net.num_stored(),
                "bytes_per_mask": self.net.mask_bytes(), "bn_bytes_per_task": self.bn_bytes_per_task()}

    def bn_bytes_per_task(self) -> int:
        if not self.masked or getattr(self.params, "batchnorm", "per_task") == "shared":
            return 0
        return 4 * self.net.bn_values_per_task()

    def generator(self, *parts: int) -> torch.Generator:
        from ..core.seeding import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, *parts))


def masked_net(strategy: ContinualStrategy) -> SupermaskNet:
    if not isinstance(strategy.net, SupermaskNet):
        raise TypeError(f"{type(strategy).__name__} has no supermask network")
    return strategy.net

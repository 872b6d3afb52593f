"""The continual strategy template: a network plus per-task state, driven task by task by the engine's task loop
(``kbricks.engine.continual``) through named lifecycle steps:

    before_task(t)                       # plugins' before_task too
    for stage in stages(t):              # default: one stage; SupSup: [mask]; ImpressLearn: [impression..., alpha]
        params = begin_stage(stage)      # what this stage optimises (default: every trainable weight)
        ... the engine's Loop trains training_step on stage.task's data ...
        end_stage(stage)                 # freeze what was learned (store the mask, keep the coefficients)
    after_task(t)                        # plugins' post-task step (Fisher, teacher snapshot, buffer update)
    evaluate every seen task with predicted_labels(x, j)

:class:`ContinualStrategy` is complete as it is for a dense network (it is the fine-tuning baseline): every default
is usable, and the output head is chosen by ``method.head`` (one shared head, one head per task, or one head over the
union of the tasks' classes). A regulariser, a replay buffer or a post-task step is a :class:`ContinualPlugin`
(``kbricks.continual.plugins``) listed by :meth:`make_plugins`, so a dense strategy is one small file (``ewc.py``,
``lwf.py``, ``replay.py``). Everything supermask-specific (masks chosen per call with ``net.using(source, task)``,
per-task BatchNorm slots, calibration, mask storage) is :class:`SupermaskStrategy`'s, which SupSup and ImpressLearn
derive from.

A strategy never runs an optimisation loop itself. The engine switches the module to train mode at the start of every
epoch and to eval mode for evaluation, so every task's BatchNorm slot is estimated by that task's own training
(``tests/test_continual_bn.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import OptimConfig
from ..methods.base import Batch, Method, MethodContext, MethodParams
from ..models import count_parameters, create_model
from ..models.masked import MaskSource, SupermaskNet
from ..models.supermask import supermask

if TYPE_CHECKING:
    from .plugins import ContinualPlugin


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


class DenseParams(ContinualParams):
    head: Literal["shared", "per_task", "union"] = Field(
        "shared", description="shared: one head over the task's own labels, no task id needed (domain-incremental on Permuted/"
        "Rotated); per_task: one head per task, chosen by the task id (task-incremental); union: one head over every task's "
        "classes, predicting among all classes seen so far without the task id (class-incremental, e.g. Split digits)")


class StrategyParams(ContinualParams):
    density: float = Field(0.5, gt=0, le=1, description="fraction of weights each mask keeps (edge-popup's k)")
    batchnorm: Literal["per_task", "shared"] = Field(
        "per_task", description="BatchNorm running statistics per task, or one set shared by every task (SupSup issue #11's "
        "failure mode, kept as an ablation: shared statistics make earlier tasks forget)")


class ContinualStrategy(Method):
    """The lifecycle with defaults for a dense network trained on every task in turn (nothing kept per task but the
    heads, when there is one per task); subclasses override what they change, plugins add to it."""

    Config = DenseParams
    masked = False  # True: a frozen supermask network (SupermaskStrategy)

    def __init__(self, params: ContinualParams, ctx: MethodContext):
        super().__init__()
        if not ctx.scenario:
            raise ValueError("a continual strategy needs a scenario (data.scenario)")
        self.params, self.cfg = params, ctx.cfg
        self.task_classes = [t.num_classes for t in ctx.scenario]
        self.class_offsets = [sum(self.task_classes[:t]) for t in range(len(self.task_classes))]
        self.scenario, self.transform, self.device = ctx.scenario, ctx.transform, ctx.device
        train = ctx.scenario[0].train
        self.num_outputs = self.output_count()
        body = create_model(ctx.cfg.model.name, num_classes=self.num_outputs, in_channels=train.in_channels,
                            image_size=train.image_size, **ctx.cfg.model.kwargs)
        self.net = self.make_network(body)
        self.task = 0
        self.stage: Optional[Stage] = None
        if not self.masked:  # a union head predicts among the classes of the tasks learned so far: kept with the weights
            self.register_buffer("tasks_learned", torch.zeros((), dtype=torch.long))
        self.plugins = nn.ModuleList(self.make_plugins())

    # ---- what is built -------------------------------------------------------------------------------------
    @property
    def head(self) -> str:
        return getattr(self.params, "head", "shared")

    def output_count(self) -> int:
        """The network's outputs: the largest task (shared head) or every task's classes side by side."""
        from ..errors import ConfigError

        widest = max(self.task_classes)
        if self.head != "shared":
            if self.params.outputs is not None:
                raise ConfigError(f"method.outputs is for a shared head; method.head={self.head} has one output per class of every task")
            return sum(self.task_classes)
        if self.params.outputs is not None:
            if self.params.outputs < widest:
                raise ConfigError(f"method.outputs={self.params.outputs} is smaller than the largest task ({widest} classes)")
            return self.params.outputs
        return widest

    def make_network(self, body: nn.Module) -> nn.Module:
        return body  # dense: initialised from the run seed (build_experiment seeds torch first)

    def make_plugins(self) -> List["ContinualPlugin"]:
        """The plugins this strategy composes (regularisers, replay, post-task steps), in the order their losses add."""
        return []

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    # ---- lifecycle (called by the engine) ------------------------------------------------------------------
    def before_task(self, t: int) -> None:
        self.task = t
        for p in self.plugins:
            p.before_task(self, t)

    def stages(self, t: int) -> List[Stage]:
        return [Stage("train", t, self.cfg.optim, self.cfg.train.epochs)]

    def begin_stage(self, stage: Stage) -> List[nn.Parameter]:
        self.stage = stage
        return [p for p in self.net.parameters() if p.requires_grad]

    def end_stage(self, stage: Stage) -> None:
        self.stage = None

    def after_task(self, t: int) -> None:
        if not self.masked:
            self.tasks_learned.fill_(t + 1)
        for p in self.plugins:
            p.after_task(self, t)

    def stage_label(self, stage: Stage) -> str:
        """How progress lines name a stage of the task loop."""
        return stage.name

    def evaluated_after(self, t: int) -> bool:
        """Whether the seen tasks are evaluated after task t (False inside a block of tasks learned as a unit, e.g.
        ImpressLearn's seed phase: their accuracy-matrix row is empty)."""
        return True

    # ---- heads ---------------------------------------------------------------------------------------------
    def seen_tasks(self) -> int:
        return max(int(self.tasks_learned), self.task + 1) if not self.masked else self.task + 1

    def head_logits(self, out: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """The network output ``out`` restricted, sample by sample, to what the head of each sample's task may
        predict (``tasks``: one task id per sample); columns it may not predict are -inf."""
        if self.head == "shared":
            return out
        cols = torch.arange(out.shape[1], device=out.device)
        if self.head == "union":
            allowed = (cols < sum(self.task_classes[: self.seen_tasks()])).expand_as(out)
        else:
            lo = torch.tensor(self.class_offsets, device=out.device)[tasks].unsqueeze(1)
            hi = lo + torch.tensor(self.task_classes, device=out.device)[tasks].unsqueeze(1)
            allowed = (cols >= lo) & (cols < hi)
        return out.masked_fill(~allowed, float("-inf"))

    def head_targets(self, y: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Labels in the network's output space (a task's own labels shifted to its columns unless the head is shared)."""
        if self.head == "shared":
            return y
        return y + torch.tensor(self.class_offsets, device=y.device)[tasks]

    def head_bytes_per_task(self) -> int:
        """fp32 bytes of the output-layer rows one task adds (0 for a shared head)."""
        if self.head == "shared":
            return 0
        layer = output_layer(self.net)
        per_class = layer.weight[0].numel() + (1 if layer.bias is not None else 0)
        return round(4 * per_class * sum(self.task_classes) / self.num_tasks)

    # ---- training ------------------------------------------------------------------------------------------
    def training_source(self) -> Optional[MaskSource]:
        return None

    def task_logits(self, x: torch.Tensor, source: Optional[MaskSource], t: int) -> torch.Tensor:
        """Task ``t``'s logits on ``x``, its own classes first (a union head: then the other classes seen so far)."""
        out = self.net(x)
        if self.head == "shared":
            return out
        lo, k = self.class_offsets[t], self.task_classes[t]
        if self.head == "per_task":
            return out[:, lo:lo + k]
        seen = sum(self.task_classes[: self.seen_tasks()])
        return torch.cat([out[:, lo:lo + k], out[:, :lo], out[:, lo + k:seen]], 1)

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """Cross-entropy of the current batch plus any replayed samples (each through its own task's head), plus
        :meth:`regulariser` and the plugins' loss terms on the network's output for that input."""
        t = self.stage.task
        x, y, tasks = batch.x, batch.y, torch.full_like(batch.y, t)
        replayed = 0
        for p in self.plugins:
            extra = p.replay_batch(self, len(batch.y))
            if extra is not None:
                x, y, tasks = torch.cat([x, extra[0]]), torch.cat([y, extra[1]]), torch.cat([tasks, extra[2]])
                replayed += len(extra[1])
        out = self.net(x)
        ce = F.cross_entropy(self.head_logits(out, tasks), self.head_targets(y, tasks))
        losses = self.add_loss_terms(ce, x, out, tasks)
        if replayed:
            losses["replayed"] = torch.tensor(float(replayed))
        return losses

    def add_loss_terms(self, ce: torch.Tensor, x: torch.Tensor, out: torch.Tensor, tasks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The step's losses: ``ce`` plus :meth:`regulariser` (``reg``) plus each plugin's term (under its name);
        ``loss`` is their sum. The one rule every strategy's ``training_step`` follows."""
        losses = {"ce": ce.detach()}
        total = ce
        reg = self.regulariser()
        if reg is not None:
            total = total + reg
            losses["reg"] = reg.detach()
        for p in self.plugins:
            term = p.loss(self, x, out, tasks)
            if term is not None:
                total = total + term
                losses[p.name] = term.detach()
        losses["loss"] = total
        return losses

    def regulariser(self) -> Optional[torch.Tensor]:
        """A loss term on the strategy's own state (e.g. ImpressLearn's coefficient norm), added at every step."""
        return None

    # ---- evaluation ----------------------------------------------------------------------------------------
    def task_source(self, t: int) -> Optional[MaskSource]:
        return None

    def task_coefficients(self) -> Optional[torch.Tensor]:
        """Every learned task as coefficients over the stored masks, [T, layers, masks]; ``None`` when task t is
        stored mask t (SupSup) or there are no masks. Task inference works on this representation."""
        return None

    def supports_task_inference(self) -> bool:
        return self.masked

    def uses_task_id(self) -> bool:
        """Whether predicting needs the task id (False: the accuracy is task-free, e.g. a shared or union head)."""
        return self.head == "per_task"

    @torch.no_grad()
    def predict_task(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Logits for task ``t`` (its own classes first). Call ``eval()`` first for evaluation statistics."""
        return self.task_logits(x, self.task_source(t), t)

    @torch.no_grad()
    def predicted_labels(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Predicted labels in task ``t``'s own label space; a union head predicts among every class seen so far,
        and a class of another task is -1 (always wrong)."""
        logits = self.predict_task(x, t)
        k = self.task_classes[t]
        if self.head == "union" and not self.masked:
            guess = logits.argmax(1)
            return torch.where(guess < k, guess, torch.full_like(guess, -1))
        return logits[:, :k].argmax(1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        return self.predict_task(x, self.task)

    def per_task_storage(self) -> Dict[str, object]:
        """What grows with every task: the strategy's own state (here: a task's head rows) plus each plugin's."""
        head = self.head_bytes_per_task()
        parts = [f"{self.head} head rows (fp32)"] if head else []
        total = float(head)
        for p in self.plugins:
            b, what = p.bytes_per_task(self)
            if b:
                total += b
                parts.append(what)
        return {"entries": total / 4, "bytes": total, "what": " + ".join(parts) or "nothing (one shared dense network)"}

    def summary(self) -> Dict[str, object]:
        """What the run's results record about the stored state (besides ``per_task_storage``)."""
        fixed = {p.name: p.fixed_bytes(self) for p in self.plugins}
        out: Dict[str, object] = {"shared_params": count_parameters(self.net), "head": self.head, "uses_task_id": self.uses_task_id(),
                                  "bn_bytes_per_task": 0}
        if self.plugins:
            out["fixed_bytes"] = float(sum(fixed.values()))
            out["plugins"] = {p.name: p.describe() for p in self.plugins}
        return out

    def generator(self, *parts: int) -> torch.Generator:
        from ..core.seeding import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, *parts))


class SupermaskStrategy(ContinualStrategy):
    """A frozen random network whose masks are chosen per call (``with net.using(source, task)``); every task has its
    own BatchNorm statistics unless ``batchnorm: shared``. Subclasses say what each stage learns (``begin_stage``,
    ``training_source``) and which masks a task uses (``task_source``)."""

    Config = StrategyParams
    masked = True

    def output_count(self) -> int:
        from ..errors import ConfigError

        outputs = max(self.task_classes)
        if self.params.outputs is not None:
            if self.params.outputs < outputs:
                raise ConfigError(f"method.outputs={self.params.outputs} is smaller than the largest task ({outputs} classes)")
            outputs = self.params.outputs
        return outputs

    def make_network(self, body: nn.Module) -> nn.Module:
        return supermask(body, self.params.density, seed=self.cfg.seed)

    def bn_slot(self, t: int) -> int:
        """Which BatchNorm statistics task ``t`` uses."""
        return 0 if getattr(self.params, "batchnorm", "per_task") == "shared" else t

    def uses_task_id(self) -> bool:
        return True  # without it, the task is inferred (evaluate_inference)

    def training_source(self) -> Optional[MaskSource]:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_source(self, t: int) -> Optional[MaskSource]:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_logits(self, x: torch.Tensor, source: Optional[MaskSource], t: int) -> torch.Tensor:
        """The network's output on ``x`` with ``source``'s masks and task ``t``'s BatchNorm statistics."""
        with self.net.using(source, task=self.bn_slot(t)):
            return self.net(x)

    def __init__(self, params: ContinualParams, ctx: MethodContext):
        super().__init__(params, ctx)
        from ..errors import ConfigError
        from .plugins import ContinualPlugin

        for p in self.plugins:  # a stored mask is frozen: replaying an earlier task's samples cannot change it
            if type(p).replay_batch is not ContinualPlugin.replay_batch:
                raise ConfigError(f"{type(self).__name__}: plugin {p.name!r} replays samples, but a supermask strategy trains only "
                                  "the current task's mask (earlier masks are frozen); drop the plugin or use a dense strategy")

    def training_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        # every output is trained: with a superfluous-neuron head the extra logits are pushed down (SupSup GNu)
        out = self.task_logits(batch.x, self.training_source(), self.stage.task)
        ce = F.cross_entropy(out, batch.y)
        return self.add_loss_terms(ce, batch.x, out, torch.full_like(batch.y, self.stage.task))

    def after_task(self, t: int) -> None:
        for p in self.plugins:
            p.after_task(self, t)

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
        if not self.net.has_task_batchnorm():
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
        return {"weights_per_mask": self.net.weights_per_mask(), "stored_masks": self.net.num_stored(),
                "bytes_per_mask": self.net.mask_bytes(), "bn_bytes_per_task": self.bn_bytes_per_task()}

    def bn_bytes_per_task(self) -> int:
        if getattr(self.params, "batchnorm", "per_task") == "shared":
            return 0
        return 4 * self.net.bn_values_per_task()


def output_layer(net: nn.Module) -> nn.Linear:
    """The network's last ``nn.Linear`` (its output layer, whose rows are the per-task heads)."""
    from ..errors import ConfigError

    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("method.head=per_task/union needs a network whose output layer is an nn.Linear")
    return linears[-1]


def masked_net(strategy: ContinualStrategy) -> SupermaskNet:
    if not isinstance(strategy.net, SupermaskNet):
        raise TypeError(f"{type(strategy).__name__} has no supermask network")
    return strategy.net

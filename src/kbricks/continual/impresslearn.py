"""ImpressLearn (Bhardwaj et al. 2022): k masks ("impressions") are learned once; every task is then only a
linear combination of them, one coefficient vector of length k per masked layer:

    mask_l(task t) = sum_i alpha[t, l, i] M_{l,i},   trained with CE + reg * sum_l (||alpha[t, l]||_1 - 1)^2

Impressions (``source``):

* ``heterogeneous`` - masks of the first k tasks (``per_task`` each). Every task's alpha spans all k impressions, so
  the first tasks form a *seed phase* learned as one block (as in the paper, where the impressions are SupSup masks
  of seed tasks learned before any alpha): with ``seed_tasks: refit`` (default), once the last impression exists each
  seed task's alpha is fit over all k impressions on its own training data (the seed tasks' data are used a second
  time, right after they were learned), and nothing is evaluated inside the block (empty accuracy-matrix rows); with
  ``seed_tasks: own_mask`` the seed tasks keep their own impression (a one-hot alpha), no data is revisited and every
  task is evaluated as usual.
* ``homogeneous`` - k masks of task 0, each with its own score initialisation and data order (the stage index
  seeds both).
* ``random`` - Bernoulli(density) masks.
* ``stored`` - masks of another run on the same backbone (``from_run``, ``slots``): e.g. SupSup masks learned once
  and reused for every k. Without ``slots``, ``impression_tasks`` picks them: ``first_k`` (the run's first k masks,
  the authors' choice) or ``spread`` (k masks spread evenly over the run's sequence, task 0 first). On RotatedMNIST
  the choice is worth tens of points (the CL study shows both).

Each alpha is fit from a start chosen on the task's training data (``alpha_init: best``: the uniform 1/k and every
single impression, scored first), and with ``keep_best`` the learned alpha is kept only when its training accuracy
is at least that of the best of those candidates; otherwise the best candidate is kept (and the task's BatchNorm
statistics are re-estimated for it). A combination is therefore never worse on its training data than the best
single impression. These are kbricks' settings, not the authors'.

``recipe`` selects one of the authors' two published recipes instead (it sets the fields it names; a field the
config sets to another value is refused in one line, naming both values; ``summary()["recipe"]`` records the values
used):

* ``authors_cifar`` - their CIFAR code: ``alpha_init: uniform``, ``start_at_optimal: true`` (a seed task starts at its
  own impression), ``keep_best: false``, ``alpha_optim`` Adam lr 0.02 with weight decay 0.01;
* ``authors_mnist`` - their MNIST notebook and scripts: alpha from 1/k (``alpha_init: uniform``,
  ``start_at_optimal: false``, ``keep_best: false``) trained by RMSprop lr 1e-3 for ``alpha_steps: 938`` steps with
  cross-entropy only (``reg: 0``); impression masks keep the top 25 % of the weights by raw score
  (``density: 0.25``, ``mask_ranking: raw``); the impressions are the first k tasks (``impression_tasks: first_k``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import OptimConfig
from ..errors import ConfigError
from ..methods.base import METHODS
from ..models.masked import (
    CachedWeights,
    Combination,
    MaskedLayer,
    MaskSource,
    ScoreMasks,
    StoredMask,
    TopKStraightThrough,
    unpack_bits,
)
from .strategy import Stage, StrategyParams, SupermaskStrategy

RECIPES: Dict[str, Dict[str, object]] = {
    "authors_cifar": {"alpha_init": "uniform", "start_at_optimal": True, "keep_best": False,
                      "alpha_optim": {"name": "adam", "lr": 0.02, "weight_decay": 0.01, "schedule": "constant"}},
    "authors_mnist": {"alpha_init": "uniform", "start_at_optimal": False, "keep_best": False, "reg": 0.0,
                      "alpha_optim": {"name": "rmsprop", "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant"},
                      "alpha_steps": 938, "density": 0.25, "mask_ranking": "raw", "impression_tasks": "first_k"},
}


class RawScoreMasks(ScoreMasks):
    """Edge-popup masks ranked by the raw score (the authors' MNIST code) instead of its magnitude."""

    def mask(self, index: int, layer: "MaskedLayer") -> torch.Tensor:
        return TopKStraightThrough.apply(self.scores[index], self.density)


def recipe_value_equal(mine: object, recipe: object) -> bool:
    if isinstance(recipe, OptimConfig):
        return isinstance(mine, OptimConfig) and mine.model_dump() == recipe.model_dump()
    return mine == recipe


def recipe_overrides(recipe: str) -> List[str]:
    """Config overrides that set every field ``recipe`` names to its value: a config file that sets some of them
    (e.g. ``density``) then agrees with the recipe instead of conflicting with it."""
    import json

    return [f"method.{key}={json.dumps(value)}" for key, value in RECIPES[recipe].items()]


def spread(num_tasks: int, k: int) -> List[int]:
    """k task indices spread evenly over a sequence of ``num_tasks`` (0 first)."""
    return sorted({int(math.floor(i * num_tasks / k)) for i in range(k)})


def alpha_regulariser(alpha: torch.Tensor) -> torch.Tensor:
    """sum over layers of (||alpha_l||_1 - 1)^2: keeps the combined mask on the scale of one mask."""
    return ((alpha.abs().sum(1) - 1.0) ** 2).sum()


@METHODS.register("impresslearn", tags=("continual",))
class ImpressLearn(SupermaskStrategy):
    class Config(StrategyParams):
        impressions: int = Field(5, ge=1, description="k, the number of impression masks")
        source: Literal["heterogeneous", "homogeneous", "random", "stored"] = Field(
            "heterogeneous", description="masks of the first tasks / several masks of task 0 / Bernoulli masks / another run's masks")
        per_task: int = Field(1, ge=1, description="heterogeneous: impressions learned on each seed task")
        seed_tasks: Literal["refit", "own_mask"] = Field(
            "refit", description="heterogeneous: seed tasks get an alpha over all k impressions once the last one exists "
            "(their data used again), or keep their own impression")
        from_run: Optional[str] = Field(None, description="stored: the run directory whose masks are the impressions")
        slots: Optional[List[int]] = Field(None, description="stored: which of that run's masks (default: the first k)")
        alpha_init: Literal["best", "uniform"] = Field(
            "best", description="start from the best of {1/k, each single impression} on the training data, or from 1/k")
        start_at_optimal: bool = Field(False, description="a task whose own mask is an impression starts at that one-hot (authors)")
        keep_best: bool = Field(True, description="keep the learned alpha only if it is at least as accurate on the training data "
                                "as the best single impression / 1/k; else keep that")
        select_images: int = Field(4096, ge=1, description="training images used to score starts and the final choice")
        reg: float = Field(0.005, ge=0, description="weight of sum_l (||alpha_l||_1 - 1)^2")
        alpha_optim: OptimConfig = Field(default_factory=lambda: OptimConfig(name="adam", lr=0.05, weight_decay=0.0, schedule="constant"),
                                         description="optimiser of the coefficients")
        alpha_epochs: Optional[int] = Field(None, ge=1, description="epochs of coefficient training (default: train.epochs)")
        alpha_steps: Optional[int] = Field(None, ge=1, description="coefficient training in steps (rounded up to whole epochs; "
                                           "overrides alpha_epochs)")
        mask_ranking: Literal["abs", "raw"] = Field("abs", description="impression masks keep the top weights by |score| or by raw score")
        impression_tasks: Literal["first_k", "spread"] = Field(
            "first_k", description="stored without slots: the from_run's first k masks, or k masks spread over its sequence")
        recipe: Optional[Literal["authors_mnist", "authors_cifar"]] = Field(
            None, description="one of the authors' recipes; sets the fields it names (see the module doc)")

        @model_validator(mode="after")
        def _recipe(self):
            for key, value in RECIPES.get(self.recipe, {}).items():
                value = OptimConfig(**value) if key == "alpha_optim" else value
                mine = getattr(self, key)
                if key in self.model_fields_set and not recipe_value_equal(mine, value):
                    shown = lambda v: v.model_dump(exclude_defaults=True) if isinstance(v, OptimConfig) else v  # noqa: E731
                    raise ValueError(f"recipe {self.recipe} sets {key}={shown(value)!r} but the config sets {key}={shown(mine)!r}; "
                                     f"drop {key} from the config or drop the recipe")
                self.__dict__[key] = value
            return self

        @model_validator(mode="after")
        def _stored_needs_a_run(self):
            if self.source == "stored" and not self.from_run:
                raise ValueError("source: stored needs from_run (a run directory holding the impression masks)")
            if self.slots is not None and len(self.slots) != self.impressions:
                raise ValueError(f"slots lists {len(self.slots)} masks but impressions={self.impressions}")
            if self.impression_tasks == "spread" and self.source != "stored":
                raise ValueError(f"impression_tasks: spread needs source: stored (source {self.source} learns the impressions on the "
                                 "first tasks, before any later task exists); use first_k or store another run's masks")
            if self.impression_tasks == "spread" and self.slots is not None:
                raise ValueError("give slots or impression_tasks: spread, not both")
            return self

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.scores = nn.ParameterList()
        self.alpha: Optional[nn.Parameter] = None
        self.alphas: Dict[int, torch.Tensor] = {}  # task -> [layers, k]
        self.fit_info: Dict[int, torch.Tensor] = {}  # task -> [start (-1: 1/k), best candidate acc, learned acc, kept learned]
        self._start = -1  # the current alpha stage's start (-1: 1/k, else an impression)
        self.learned = 0  # tasks finished
        self._candidates: Optional[List] = None  # (name, alpha, (acc, ce)) scored for the current alpha stage
        self._cached = None  # ((task, masks stored), CachedWeights) of the last evaluated task
        p = params
        if p.source == "heterogeneous":
            self.seed_count = math.ceil(p.impressions / p.per_task)
            if self.seed_count > self.num_tasks:
                raise ConfigError(f"method.impressions={p.impressions} heterogeneous impressions ({p.per_task} per task) need "
                                  f"{self.seed_count} tasks; the scenario has {self.num_tasks}")
        else:
            self.seed_count = 0
        self.own_slot: Dict[int, int] = {j: j * p.per_task for j in range(self.seed_count)}
        if p.source == "random":
            for j in range(p.impressions):
                g = self.generator(0, j, 11)
                self.net.store([torch.rand(layer.weight.shape, generator=g) < self.net.density for layer in self.net.masked_layers()])
        elif p.source == "stored":
            self.load_impressions(Path(p.from_run), p.slots)

    def load_impressions(self, run_dir: Path, slots: Optional[List[int]]) -> None:
        """Append masks ``slots`` of the run in ``run_dir`` to the banks (default: as ``impression_tasks`` picks them),
        after checking the backbone is this one."""
        from ..core.checkpoint import load_checkpoint

        path = run_dir / "ckpt" / "last.pt"
        if not path.exists():
            raise ConfigError(f"method.from_run: {str(run_dir)!r} holds no checkpoint (ckpt/last.pt)")
        ckpt = load_checkpoint(path)
        state = ckpt["model"]
        banks = []
        for name, layer in self.named_modules():
            if not isinstance(layer, MaskedLayer):
                continue
            w, bank = state.get(f"{name}.weight"), state.get(f"{name}.bank._extra_state")
            if w is None or bank is None or not torch.equal(w.to(layer.weight.device), layer.weight):
                raise ConfigError(f"method.from_run: {str(run_dir)!r} was trained on a different backbone (model or seed) "
                                  f"than this run (layer {name})")
            if slots is not None and int(bank["count"]) <= max(slots):
                raise ConfigError(f"method.slots: {str(run_dir)!r} stores {int(bank['count'])} masks, slot {max(slots)} requested")
            banks.append(bank["packed"])
        if slots is None:
            count, k = int(bank["count"]), self.params.impressions
            if count < k:
                raise ConfigError(f"method.impressions={k}: {str(run_dir)!r} stores only {count} masks")
            slots = spread(count, k) if self.params.impression_tasks == "spread" else list(range(k))
        self.impression_slots = list(slots)
        for s in slots:
            self.net.store([unpack_bits(b[s], layer.bank.numel).view(layer.bank.shape) for b, layer in zip(banks, self.net.masked_layers())])
        # a SupSup run on this very scenario: its mask s is task s's own mask
        cfg = ckpt.get("config", {})
        if cfg.get("method", {}).get("name") == "supsup" and cfg.get("data") == self.cfg.to_dict()["data"]:
            self.own_slot = {t: i for i, t in enumerate(slots)}

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def stages(self, t: int) -> List[Stage]:
        p, have = self.params, self.net.num_stored()
        alpha = lambda j: Stage("alpha", j, p.alpha_optim, self.alpha_epochs(j), index=j)  # noqa: E731
        impression = lambda j: Stage("impression", t, self.cfg.optim, self.cfg.train.epochs, index=j)  # noqa: E731
        if p.source == "homogeneous" and t == 0:
            return [impression(j) for j in range(p.impressions)] + [alpha(0)]
        if p.source == "heterogeneous" and t < self.seed_count:
            out = [impression(have + j) for j in range(min(p.per_task, p.impressions - have))]
            if t == self.seed_count - 1 and p.seed_tasks == "refit":
                out += [alpha(j) for j in range(self.seed_count)]
            return out
        return [alpha(t)]

    def alpha_epochs(self, t: int) -> int:
        p, train = self.params, self.cfg.train
        if p.alpha_steps is None:
            return p.alpha_epochs or train.epochs
        per_epoch = max(1, len(self.scenario[t].train) // train.batch_size)
        if train.max_steps_per_epoch:
            per_epoch = min(per_epoch, train.max_steps_per_epoch)
        return math.ceil(p.alpha_steps / per_epoch)

    def begin_stage(self, stage: Stage) -> List[nn.Parameter]:
        self.stage = stage
        if stage.name == "impression":
            self.scores = nn.ParameterList(self.net.new_scores(self.generator(stage.task, stage.index, 7)))
            return list(self.scores)
        self._candidates = None
        p = self.params
        own = self.own_slot.get(stage.task)
        self._start, start = (own, self.one_hot(own)) if p.start_at_optimal and own is not None else (-1, self.uniform())
        if p.alpha_init == "best":
            name, start, _ = max(self.candidates(stage.task), key=lambda c: (c[2][0], -c[2][1]))
            self._start = -1 if name == "uniform" else int(name[len("impression"):])
        self.alpha = nn.Parameter(start.clone())
        return [self.alpha]

    def uniform(self) -> torch.Tensor:
        k, layers = self.net.num_stored(), len(self.net.masked_layers())
        return torch.full((layers, k), 1.0 / k, device=self.net.masked_layers()[0].weight.device)

    def one_hot(self, slot: int) -> torch.Tensor:
        a = torch.zeros_like(self.uniform())
        a[:, slot] = 1.0
        return a

    def candidates(self, t: int) -> List:
        """1/k and every single impression, scored on task t's training images (computed once per stage)."""
        if self._candidates is None:
            named = [("uniform", self.uniform())] + [(f"impression{i}", self.one_hot(i)) for i in range(self.net.num_stored())]
            scores = self.score_sources([CachedWeights(self.net, Combination(a)) for _, a in named], t, self.params.select_images)
            self._candidates = [(n, a, s) for (n, a), s in zip(named, scores)]
        return self._candidates

    def end_stage(self, stage: Stage) -> None:
        if stage.name == "impression":
            if self.params.mask_ranking == "raw":
                self.net.store([RawScoreMasks([s], self.net.density).mask(0, None).detach() > 0 for s in self.scores])
            else:
                self.net.store_scores(list(self.scores))
            self.scores = nn.ParameterList()
        else:
            t, learned = stage.task, self.alpha.detach().clone()
            _, best_alpha, (best_acc, _) = max(self.candidates(t), key=lambda c: (c[2][0], -c[2][1]))
            (learned_acc, _), = self.score_sources([CachedWeights(self.net, Combination(learned))], t, self.params.select_images)
            keep = not self.params.keep_best or learned_acc >= best_acc
            if not keep:
                learned = best_alpha.clone()
                self.calibrate_batchnorm(CachedWeights(self.net, Combination(learned)), t, self.params.select_images)
            self.fit_info[t] = torch.tensor([self._start, best_acc, learned_acc, float(keep)])
            self.alphas[t] = learned
            self.alpha, self._candidates, self._cached = None, None, None
        super().end_stage(stage)

    def after_task(self, t: int) -> None:
        self.learned = t + 1

    def stage_label(self, stage: Stage) -> str:
        return f"{stage.name}{stage.index}" if stage.name == "impression" else stage.name

    def evaluated_after(self, t: int) -> bool:
        # the seed phase is one block, as in the paper where the impressions exist before any task is evaluated
        p = self.params
        return not (p.source == "heterogeneous" and p.seed_tasks == "refit" and t < self.seed_count - 1)

    # ---- training ------------------------------------------------------------------------------------------
    def training_source(self) -> MaskSource:
        if self.stage.name == "impression":
            masks = RawScoreMasks if self.params.mask_ranking == "raw" else ScoreMasks
            return masks(list(self.scores), self.net.density)
        return Combination(self.alpha)

    def regulariser(self) -> Optional[torch.Tensor]:
        if self.stage.name != "alpha" or not self.params.reg:
            return None  # reg 0 (authors_mnist): cross-entropy only
        return self.params.reg * alpha_regulariser(self.alpha)

    # ---- evaluation ----------------------------------------------------------------------------------------
    def coefficients(self, t: int) -> torch.Tensor:
        """Task t's [layers, K] coefficients over the stored masks: its alpha, or (a seed task before its alpha is
        fit, or with ``seed_tasks: own_mask``) the one-hot of its own impression."""
        if t in self.alphas:
            return self.alphas[t]
        if t in self.own_slot:
            return self.one_hot(self.own_slot[t])
        raise KeyError(f"task {t} has not been learned")

    def task_source(self, t: int) -> MaskSource:
        """Task t's combined masks, computed once (k x N per layer) and kept while t is evaluated: every further
        batch is a plain masked forward, whatever the number of tasks."""
        key = (t, self.net.num_stored())
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, CachedWeights(self.net, Combination(self.coefficients(t))))
        return self._cached[1]

    def task_coefficients(self) -> Optional[torch.Tensor]:
        return torch.stack([self.coefficients(t) for t in range(self.learned)])

    def per_task_storage(self) -> Dict[str, object]:
        entries = len(self.net.masked_layers()) * self.params.impressions
        bn = self.bn_bytes_per_task()
        return {"entries": float(entries), "bytes": 4.0 * entries + bn,
                "what": "fp32 coefficients (k per masked layer)" + (" + BatchNorm statistics" if bn else "")}

    def summary(self) -> Dict[str, object]:
        out = super().summary()
        out["impression_bytes"] = self.params.impressions * self.net.mask_bytes()  # shared by every task, paid once
        p = self.params
        if p.recipe:
            out["recipe"] = {"name": p.recipe, **{k: (getattr(p, k).model_dump() if k == "alpha_optim" else getattr(p, k)) for k in RECIPES[p.recipe]}}
        if p.source == "heterogeneous":
            out["impression_tasks"] = sorted({j // p.per_task for j in range(p.impressions)})
        elif p.source == "stored":
            out["impression_tasks"] = list(getattr(self, "impression_slots", p.slots or []))
        if self.fit_info:
            rows = [self.fit_info[t].tolist() for t in sorted(self.fit_info)]
            out["alpha_fit"] = {"task": sorted(self.fit_info), "start": [int(r[0]) for r in rows], "best_candidate_train_acc": [r[1] for r in rows],
                                "learned_train_acc": [r[2] for r in rows], "kept_learned": [bool(r[3]) for r in rows]}
        return out

    def get_extra_state(self):
        state = {f"alpha_{t}": a for t, a in self.alphas.items()}
        state.update({f"fit_{t}": f for t, f in self.fit_info.items()})
        state["learned"] = torch.tensor(self.learned)
        return state

    def set_extra_state(self, state) -> None:
        self.alphas = {int(k.split("_")[1]): v for k, v in state.items() if k.startswith("alpha_")}
        self.fit_info = {int(k.split("_")[1]): v for k, v in state.items() if k.startswith("fit_")}
        self.learned = int(state.get("learned", len(self.alphas)))
        self._cached = None


@torch.no_grad()
def mask_transfer_matrix(exp) -> List[List[float]]:
    """A[i][j]: test accuracy on task j of stored mask i alone (with mask i's own BatchNorm statistics): ImpressLearn's
    sanity check that an impression on a task it was not trained for is near chance. ``exp``: a continual run's
    experiment with its strategy's state loaded (``kbricks.engine.continual.load_continual_run``)."""
    s, bs = exp.method, exp.cfg.train.eval_batch_size
    xs = [exp.transform(t.test.x.to(exp.device), train=False) for t in exp.scenario]
    out = []
    for i in range(s.net.num_stored()):
        row = []
        for data, x in zip(exp.scenario, xs):
            logits = torch.cat([s.task_logits(x[b:b + bs], StoredMask(i), i) for b in range(0, len(x), bs)])
            row.append((logits[:, : data.num_classes].argmax(1).cpu() == data.test.y).float().mean().item())
        out.append(row)
    return out

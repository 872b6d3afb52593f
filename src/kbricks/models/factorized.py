"""Factorized networks (Knowledge Factorization): one common-knowledge network (CKN) shared by every task, one
task-specific network (TSN) per task, and the assembled multi-task network built from them.

Factor network t = CKN + TSN_t:  logits_t = head_t(combine(z_c, z_t)),  z_c = CKN.features(x),
z_t ~ N(mu_t(x), sigma_t(x)^2) (its mean at evaluation).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import Task
from .base import Classifier
from .deploy import input_normalization
from .tsn_bank import FusedTSNs


class TaskSpecificNetwork(nn.Module):
    """A small backbone, a Gaussian encoder (mu, log-variance) of size ``dim``, and the task head."""

    def __init__(self, backbone: Classifier, dim: int, ckn_dim: int, num_outputs: int, combine: str):
        super().__init__()
        self.backbone = backbone
        self.mu = nn.Linear(backbone.feature_dim, dim)
        self.logvar = nn.Linear(backbone.feature_dim, dim)
        self.combine = combine
        self.head = nn.Linear(ckn_dim + dim if combine == "concat" else dim, num_outputs)
        self.task_head = nn.Linear(dim, num_outputs)  # training only: z_t alone must predict the task
        nn.init.constant_(self.logvar.bias, -4.0)  # start nearly deterministic; the KL term widens it as allowed

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone.features(x)
        return self.mu(h), self.logvar(h).clamp(-10.0, 10.0)

    def forward(self, x: torch.Tensor, z_c: torch.Tensor, sample: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, mu, logvar, _ = self.forward_train(x, z_c, sample)
        return logits, mu, logvar

    def forward_train(self, x: torch.Tensor, z_c: torch.Tensor, sample: bool):
        """(factor logits, mu, logvar, task-only logits from z_t alone)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        joint = torch.cat([z_c, z], 1) if self.combine == "concat" else z_c + z
        return self.head(joint), mu, logvar, self.task_head(z)


def task_output_size(task: Task, num_classes: int) -> int:
    """Class tasks that do not cover every class get an extra 'other' output."""
    if task.classes is not None and len(task.classes) < num_classes:
        return task.num_classes + 1
    return task.num_classes


class FactorNetworks(nn.Module):
    """One CKN plus one TSN per task. ``forward`` gives every factor network's logits.

    With ``fused`` (the default) the TSNs run as one batched computation (:mod:`kbricks.models.tsn_bank`) when
    their architecture allows it, else one after the other; :attr:`fusion` says which and why. The per-task
    modules in ``tsns`` hold the weights either way, so state dicts and bricks do not depend on it."""

    def __init__(self, ckn: Classifier, tsns: Sequence[TaskSpecificNetwork], fused: bool = True):
        super().__init__()
        self.ckn = ckn
        self.tsns = nn.ModuleList(tsns)
        self.fused = fused
        self._bank: Optional[FusedTSNs] = None  # built on first use, from the TSNs' structure only

    def bank(self) -> FusedTSNs:
        ids = tuple(id(t) for t in self.tsns)
        if self._bank is None or self._bank.ids != ids:  # (re)traced when the TSN modules change
            self._bank = FusedTSNs(list(self.tsns))
            self._bank.ids = ids
        return self._bank

    @property
    def fusion(self) -> str:
        if not self.fused:
            return "task by task (fused=False)"
        why = self.bank().why_not(list(self.tsns))
        return f"fused ({len(self.tsns)} TSNs as one computation)" if why is None else f"task by task: {why}"

    def tsn_outputs(self, x: torch.Tensor, z_c: torch.Tensor, sample: bool) -> Tuple[List[torch.Tensor], ...]:
        """Every TSN on the same batch: (factor logits, mu, logvar, task-only logits), one list entry per task."""
        if self.fused and len(self.tsns) > 1:
            out = self.bank()(list(self.tsns), x, z_c, sample)
            if out is not None:
                return out
        outs = [tsn.forward_train(x, z_c, sample) for tsn in self.tsns]
        return tuple(list(col) for col in zip(*outs))

    def forward(self, x: torch.Tensor, sample: bool = False) -> List[torch.Tensor]:
        z_c = self.ckn.features(x)  # computed once for all factors
        return self.tsn_outputs(x, z_c, sample)[0]

    def __getstate__(self):  # the traced bank is rebuilt on first use after copying / pickling
        return {**self.__dict__, "_bank": None}


def combined_class_scores(factor_logits: Sequence[torch.Tensor], tasks: Sequence[Task], num_classes: int,
                          temperatures: Sequence[float]) -> torch.Tensor:
    """Union classifier from class-task factors: each factor's log-probabilities for its own classes at the
    temperature it was distilled at, placed in the teacher's class order; classes no chosen factor covers get -inf.

    A factor distilled at T towards the teacher's tempered softmax merged into [its classes, other] satisfies
    log_softmax(logits / T)[c] = z_c / T - logsumexp(z / T) for its classes c, the same offset in every factor, so
    the union's argmax is the teacher's. At T = 1 the offsets differ between factors and the argmax can flip."""
    ref = factor_logits[0]
    scores = torch.full((ref.shape[0], num_classes), float("-inf"), device=ref.device, dtype=ref.dtype)
    for logits, task, t in zip(factor_logits, tasks, temperatures):
        scores[:, list(task.classes)] = F.log_softmax(logits / t, dim=1)[:, : task.num_classes]
    return scores


class AssembledNetwork(nn.Module):
    """The CKN computed once, then each chosen TSN, behind the bricks' input normalisation: it takes raw inputs
    (what the dataset holds, before normalisation), like its teacher's whole pipeline. ``assemble`` returns an
    :class:`AssembledClassifier` (class tasks: one score vector over the union of their classes) or an
    :class:`AssembledMultiTask` (latent tasks: one output per task). Both compile with ``torch.jit.script``."""

    # Python-side descriptions, never read by forward: kept out of TorchScript
    __jit_ignored_attributes__ = ["tasks", "manifests", "info"]
    __jit_unused_properties__ = ["factors", "is_class_union", "classes", "output_names"]

    def __init__(self, factors: FactorNetworks, tasks: Sequence[Task], num_classes: int, manifests: Sequence[Dict[str, Any]],
                 temperatures: Sequence[float], normalize: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.normalize = input_normalization(normalize)
        # the factors' modules held directly (same state-dict names as FactorNetworks): TorchScript compiles
        # every submodule's forward, and only the assembled path needs to compile
        self.ckn, self.tsns = factors.ckn, factors.tsns
        self.tasks, self.num_classes = list(tasks), num_classes
        self.manifests = list(manifests)
        self.temperatures: List[float] = [float(t) for t in temperatures]
        self.info = {}  # what save_assembled / load_assembled record: input, outputs, fingerprint

    @property
    def factors(self) -> FactorNetworks:
        """The CKN and chosen TSNs as factor networks (shared modules; they take normalised inputs)."""
        return FactorNetworks(self.ckn, list(self.tsns))

    @property
    def is_class_union(self) -> bool:
        return all(t.classes is not None for t in self.tasks)

    @property
    def classes(self) -> List[int]:
        return sorted(c for t in self.tasks for c in (t.classes or ()))

    @property
    def output_names(self) -> List[str]:
        return ["scores"] if self.is_class_union else [f"logits_{t.name}" for t in self.tasks]

    @torch.jit.export
    def factor_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every chosen factor network's logits on raw inputs ``x``."""
        x = self.normalize(x)
        z_c = self.ckn.features(x)  # computed once for all factors
        outs: List[torch.Tensor] = []
        for tsn in self.tsns:
            outs.append(tsn(x, z_c, False)[0])
        return outs


class AssembledClassifier(AssembledNetwork):
    """Class tasks: log-probabilities over the union of their classes, in the teacher's class order (see
    :func:`combined_class_scores`); classes no chosen brick covers score -inf."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        covered = [c for t in self.tasks for c in t.classes]
        index = [len(covered)] * self.num_classes  # uncovered classes read the trailing -inf column
        for column, c in enumerate(covered):
            index[c] = column
        self.register_buffer("class_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.class_counts: List[int] = [t.num_classes for t in self.tasks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts: List[torch.Tensor] = []
        for i, logits in enumerate(self.factor_outputs(x)):
            parts.append(F.log_softmax(logits / self.temperatures[i], dim=1)[:, : self.class_counts[i]])
        ref = parts[0]
        parts.append(torch.full((ref.shape[0], 1), float("-inf"), dtype=ref.dtype, device=ref.device))
        return torch.index_select(torch.cat(parts, 1), 1, self.class_index)


class AssembledMultiTask(AssembledNetwork):
    """Latent tasks: one logit tensor per task, in the order the bricks were given."""

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.factor_outputs(x)

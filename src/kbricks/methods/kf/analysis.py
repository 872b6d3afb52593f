"""Representation analysis, one protocol for every representation (raw dimensions, nothing reduced on one side only):

- MIG (Chen et al. 2018): histogram-discretised mutual information of every code dimension with every factor.
- DCI (Eastwood & Williams 2018), as disentanglement_lib computes it: an importance matrix R[code, factor] from one
  gradient-boosted-trees classifier per factor (sklearn's ``feature_importances_``, which sum to 1 per factor);
  D = sum over codes of rho_code * (1 - entropy over factors of the code's row, base K), rho = row sums / total;
  C = mean over factors of (1 - entropy over codes of the factor's column, base D); I = the classifiers' test
  accuracy. ``importance="linear"`` uses validated logistic-probe weights instead (fast, no scikit-learn), normalised
  the same way. Each factor's importances are normalised to sum to 1 whatever the estimator: raw probe weights grow
  with a factor's number of classes, which made the factor with most classes dominate every code (D ~ 1 for any code).
- SAP (Kumar et al. 2018): per (dimension, factor), the test accuracy of a one-dimensional classifier (the majority
  class of each of ``bins`` histogram bins of the training codes); the gap between the two best dimensions.
- Linear probes: multinomial logistic regression on standardised features; the L2 strength is chosen on a
  validation split of the training features (never on the test split), then the probe is refit on all of them.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError

PROBE_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths a probe chooses from (validation split)


def _discretize(codes: np.ndarray, bins: int) -> np.ndarray:
    out = np.zeros_like(codes, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, d], bins=bins)
        out[:, d] = np.digitize(codes[:, d], edges[1:-1])
    return out


def discrete_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats for two integer arrays."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def entropy(a: np.ndarray) -> float:
    _, counts = np.unique(a, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_info_gap(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> Dict[str, float]:
    """MIG: for each factor, the gap between the two code dimensions most informative about it, normalised by the
    factor's entropy; averaged over factors. 1 = each factor in exactly one dimension. Raw dimensions only."""
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least 2 code dimensions")
    disc = _discretize(codes, bins)
    gaps = {}
    for k in range(factors.shape[1]):
        h = entropy(factors[:, k])
        if h == 0:
            continue
        mi = sorted((discrete_mutual_info(disc[:, d], factors[:, k]) for d in range(disc.shape[1])), reverse=True)
        gaps[k] = (mi[0] - mi[1]) / h
    return {"mig": float(np.mean(list(gaps.values()))), **{f"mig_factor{k}": v for k, v in gaps.items()}}


# ---- linear probes -------------------------------------------------------------------------------------------


def _standardize(train_x: torch.Tensor, *others: torch.Tensor):
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train_x, *others)]


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_cls: int, weight_decay: float, steps: int = 100) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L-BFGS) on already standardised features."""
    g = torch.Generator().manual_seed(0)
    w = (0.01 * torch.randn(x.shape[1], n_cls, generator=g)).requires_grad_()
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(x, y, w, b) -> float:
    return ((x @ w + b).argmax(1) == y).float().mean().item()


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_fraction: float = 0.2, seed: int = 0,
              weight_decays: Optional[Sequence[float]] = None):
    """Choose the L2 strength on a seeded validation split of the training features (best validation accuracy;
    ties go to the stronger regularisation), then refit on every training feature. Returns a dict with the
    weights, the standardisation and the chosen strength."""
    weight_decays = PROBE_WEIGHT_DECAYS if weight_decays is None else weight_decays
    train_x, train_y = train_x.float(), train_y.long()
    n = len(train_x)
    n_cls = int(train_y.max()) + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * n)))
    val, fit = perm[:n_val], perm[n_val:]
    xf, xv = _standardize(train_x[fit], train_x[val])
    scores = [(_accuracy(xv, train_y[val], *_fit_logistic(xf, train_y[fit], n_cls, wd)), wd) for wd in weight_decays]
    best_acc = max(a for a, _ in scores)
    wd = max(w for a, w in scores if a == best_acc)
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    w, b = _fit_logistic((train_x - mean) / std, train_y, n_cls, wd)
    return {"w": w, "b": b, "mean": mean, "std": std, "weight_decay": wd, "val_acc": best_acc, "num_classes": n_cls}


def probe_accuracy(probe, x: torch.Tensor, y: torch.Tensor) -> float:
    return _accuracy((x.float() - probe["mean"]) / probe["std"], y.long(), probe["w"], probe["b"])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, seed: int = 0) -> float:
    """Test accuracy of a linear probe whose L2 strength was chosen on a validation split of the training set."""
    return probe_accuracy(fit_probe(train_x, train_y, seed=seed), test_x, test_y)


# ---- DCI and SAP ---------------------------------------------------------------------------------------------

DCI_IMPORTANCES = ("gbt", "linear")
DCI_MARKER = "dci_gbt"  # present in every report whose DCI is the reference computation
DCI_MAX_TRAIN = 1000  # training codes the trees are fitted on (cost: ~K trees of depth 3 per round, 100 rounds)
DCI_TREES = 100  # boosting rounds: sklearn's default, which disentanglement_lib uses


@dataclass(frozen=True)
class DCIBudget:
    """How much the GBT estimator of DCI may cost: ``max_train`` training codes (None = all), ``n_estimators``
    boosting rounds. The estimator itself (sklearn's GradientBoostingClassifier, depth 3, learning rate 0.1) and the
    D / C / I definitions are the same at every budget."""

    max_train: Optional[int] = DCI_MAX_TRAIN
    n_estimators: int = DCI_TREES


DCI_REFERENCE = DCIBudget()
# `kbricks reproduce --quick` (issue 25): on the six representations of one quick dSprites run (2,400 training codes,
# 3-84 dims, factors of 3/6/8 classes) 15 s of CPU instead of 156 s; D read +0.04..+0.06 above the reference budget's
# on the trained representations and +0.06/+0.14 on the random floors, same ordering of all six; I 0.04..0.12 lower
DCI_QUICK = DCIBudget(max_train=500, n_estimators=20)
_DCI_BUDGET: contextvars.ContextVar[DCIBudget] = contextvars.ContextVar("dci_budget", default=DCI_REFERENCE)


@contextlib.contextmanager
def dci_budget(budget: DCIBudget) -> Iterator[DCIBudget]:
    """Within the block, :func:`representation_metrics` fits DCI's trees at ``budget`` (the quick studies use
    :data:`DCI_QUICK`); the report records it (``dci_train``, ``dci_trees``)."""
    token = _DCI_BUDGET.set(budget)
    try:
        yield budget
    finally:
        _DCI_BUDGET.reset(token)


def current_dci_budget() -> DCIBudget:
    return _DCI_BUDGET.get()


def _normalized_entropy(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy of each column of the (column-normalised) ``p`` in log base ``base``."""
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(0) / np.log(base)


def dci_from_importance(r: np.ndarray) -> Dict[str, float]:
    """D and C of Eastwood & Williams from an importance matrix ``r`` [codes D, factors K] (non-negative).

    Each factor's column is first normalised to sum to 1 (sklearn's GBT importances already do), so no factor
    outweighs another by the scale of its estimator. A factor with no importance at all is left out of both scores.
    With a single factor (or a single code) D (or C) is 1 by convention."""
    r = np.abs(np.asarray(r, dtype=np.float64))
    if r.ndim != 2:
        raise ValueError(f"importance matrix must be [codes, factors], got shape {r.shape}")
    d_dims, k_factors = r.shape
    col = r.sum(0)
    used = col > 0
    if not used.any():
        return {"dci_d": 0.0, "dci_c": 0.0}
    p = r[:, used] / col[used]  # [D, K']: each factor's importance over codes, summing to 1
    per_code = p.sum(1)
    rho = per_code / per_code.sum()
    if k_factors > 1:
        p_code = (p / np.clip(per_code[:, None], 1e-12, None)).T  # [K', D]: each code's importance over factors
        d_each = 1.0 - _normalized_entropy(p_code, k_factors)
    else:
        d_each = np.ones(d_dims)
    disentanglement = float((d_each * rho).sum())
    completeness = float((1.0 - _normalized_entropy(p, d_dims)).mean()) if d_dims > 1 else 1.0
    return {"dci_d": disentanglement, "dci_c": completeness}


def _gbt_importance(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                    seed: int, n_estimators: int = DCI_TREES) -> Tuple[np.ndarray, float]:
    """disentanglement_lib's estimator: sklearn's GradientBoostingClassifier at its defaults (100 rounds of depth-3
    trees); ``n_estimators`` < 100 only for a quick budget."""
    try:
        from sklearn.ensemble import GradientBoostingClassifier
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("DCI with importance='gbt' needs scikit-learn: pip install 'kbricks[data]' "
                          "(or pass importance='linear')") from exc
    model = GradientBoostingClassifier(n_estimators=n_estimators, random_state=seed).fit(train_x, train_y)
    return np.abs(model.feature_importances_), float((model.predict(test_x) == test_y).mean())


def _linear_importance(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                       seed: int, n_estimators: int = DCI_TREES) -> Tuple[np.ndarray, float]:
    """(``n_estimators`` is unused: the probe is not boosted.) |W - mean over classes| summed over classes, of a validated logistic probe on standardised codes."""
    probe = fit_probe(torch.from_numpy(train_x), torch.from_numpy(train_y), seed=seed)
    w = probe["w"]
    return (w - w.mean(1, keepdim=True)).abs().sum(1).numpy(), probe_accuracy(probe, torch.from_numpy(test_x), torch.from_numpy(test_y))


def dci(train_codes, train_factors, test_codes, test_factors, seed: int = 0, importance: str = "gbt",
        max_train: Optional[int] = DCI_MAX_TRAIN, n_estimators: int = DCI_TREES) -> Dict[str, float]:
    """DCI disentanglement / completeness / informativeness (mean test accuracy of the per-factor classifiers).

    ``importance``: ``gbt`` (default) = disentanglement_lib's gradient-boosted trees (needs scikit-learn), fitted on
    at most ``max_train`` training codes drawn with ``seed`` (disentanglement_lib also fits on a sample, 10,000 by
    default; trees cost ~0.1 s each here and a factor with K classes grows K per round), with ``n_estimators``
    boosting rounds (100, sklearn's default, unless a quick budget asks for fewer); ``linear`` = validated
    logistic-probe weights on every training code, per-factor normalised like ``gbt``: on codes linear in the
    factors without nuisance dimensions it is within 0.2 of ``gbt`` (D 0.51 vs 0.65 on the test's mixed case), and it
    spreads importance over noise dimensions that
    trees ignore and misses non-linear codes (tests/test_disentanglement_metrics.py measures both)."""
    if importance not in DCI_IMPORTANCES:
        raise ConfigError(f"unknown DCI importance {importance!r}; valid: {', '.join(DCI_IMPORTANCES)}")
    if n_estimators < 1 or (max_train is not None and max_train < 2):
        raise ConfigError(f"DCI needs n_estimators >= 1 and max_train >= 2 (or None); got {n_estimators} / {max_train}")
    train_codes, test_codes = (np.asarray(c, dtype=np.float64 if importance == "gbt" else np.float32) for c in (train_codes, test_codes))
    train_factors, test_factors = np.asarray(train_factors).astype(np.int64), np.asarray(test_factors).astype(np.int64)
    if train_codes.ndim != 2 or train_factors.ndim != 2 or len(train_codes) != len(train_factors) or len(test_codes) != len(test_factors):
        raise ValueError(f"DCI needs codes [N, D] and factors [N, K] with the same N; got {train_codes.shape} / "
                         f"{train_factors.shape} (train), {test_codes.shape} / {test_factors.shape} (test)")
    if importance == "gbt" and max_train is not None and len(train_codes) > max_train:
        keep = np.random.default_rng(seed).choice(len(train_codes), max_train, replace=False)
        train_codes, train_factors = train_codes[keep], train_factors[keep]
    estimate = _gbt_importance if importance == "gbt" else _linear_importance
    columns, accs = [], []
    for k in range(train_factors.shape[1]):
        y_tr, y_te = train_factors[:, k], test_factors[:, k]
        if len(np.unique(y_tr)) < 2:  # a constant factor: nothing to explain (left out of D and C)
            columns.append(np.zeros(train_codes.shape[1]))
            accs.append(float((y_te == y_tr[0]).mean()))
            continue
        r, acc = estimate(train_codes, y_tr, test_codes, y_te, seed, n_estimators)
        columns.append(r)
        accs.append(acc)
    out = dci_from_importance(np.stack(columns, 1))
    out["dci_i"] = float(np.mean(accs))
    return out


def sap(train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray, test_factors: np.ndarray,
        bins: int = 20) -> Dict[str, float]:
    """SAP: for each factor, the gap between the two code dimensions whose one-dimensional classifiers (majority
    class per histogram bin, bins from the training codes) predict it best on the test set; averaged over factors."""
    train_codes, test_codes = np.asarray(train_codes, dtype=np.float64), np.asarray(test_codes, dtype=np.float64)
    train_factors, test_factors = np.asarray(train_factors), np.asarray(test_factors)
    gaps = []
    for k in range(train_factors.shape[1]):
        n_cls = int(max(train_factors[:, k].max(), test_factors[:, k].max())) + 1
        scores = []
        for d in range(train_codes.shape[1]):
            edges = np.histogram_bin_edges(train_codes[:, d], bins=bins)[1:-1]
            b_tr, b_te = np.digitize(train_codes[:, d], edges), np.digitize(test_codes[:, d], edges)
            counts = np.zeros((bins, n_cls))
            np.add.at(counts, (b_tr, train_factors[:, k]), 1.0)
            majority = np.where(counts.sum(1) > 0, counts.argmax(1), np.bincount(train_factors[:, k]).argmax())
            scores.append(float((majority[b_te] == test_factors[:, k]).mean()))
        top = sorted(scores, reverse=True) + [0.0]
        gaps.append(top[0] - top[1])
    return {"sap": float(np.mean(gaps))}


def representation_metrics(train_codes: torch.Tensor, train_factors: torch.Tensor, test_codes: torch.Tensor,
                           test_factors: torch.Tensor) -> Dict[str, float]:
    """MIG (on the test codes), DCI and SAP of one representation against the factors, all on raw dimensions. DCI's
    trees are fitted at the current :func:`dci_budget` (the reference one unless a quick study set another); the
    training codes and rounds it used are recorded as ``dci_train`` and ``dci_trees``."""
    budget = current_dci_budget()
    out = {"dims": float(test_codes.shape[1])}
    out.update({k: v for k, v in mutual_info_gap(test_codes.numpy(), test_factors.numpy()).items() if k == "mig"})
    out.update(dci(train_codes, train_factors, test_codes, test_factors, max_train=budget.max_train, n_estimators=budget.n_estimators))
    out[DCI_MARKER] = 1.0  # reports without it hold the pre-issue-22 DCI (raw probe weights): not comparable
    n_train = len(train_codes) if budget.max_train is None else min(len(train_codes), budget.max_train)
    out.update({"dci_train": float(n_train), "dci_trees": float(budget.n_estimators)})
    out.update(sap(train_codes.numpy(), train_factors.numpy(), test_codes.numpy(), test_factors.numpy()))
    return out

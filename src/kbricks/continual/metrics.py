"""Continual-learning metrics from the accuracy matrix R (R[i, j] = accuracy on task j after learning task i)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def cl_metrics(R: Sequence[Sequence[Optional[float]]], untrained: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """Average accuracy (GEM), backward transfer, forgetting (Chaudhry et al.), forward transfer when the
    untrained model's accuracies ``untrained`` are given. R must be T x T with R[i, j] defined for j <= i, except
    for rows left empty (``None``) inside a block of tasks learned as a unit: a task then counts from the first row
    that evaluates it."""
    r = np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float)
    t = r.shape[0]
    if r.shape != (t, t):
        raise ValueError(f"accuracy matrix must be square, got {r.shape}")
    if np.isnan(r[-1]).any():
        raise ValueError("the last row of the accuracy matrix must evaluate every task")
    rows = [i for i in range(t) if not np.isnan(r[i, : i + 1]).all()]
    first = [next(i for i in rows if i >= j) for j in range(t)]  # the first row evaluating task j
    out = {"avg_acc": float(r[-1].mean()), "avg_incremental_acc": float(np.mean([r[i, : i + 1].mean() for i in rows]))}
    if t > 1:
        out["bwt"] = float(np.mean([r[-1, j] - r[first[j], j] for j in range(t - 1)]))
        out["forgetting"] = float(np.mean([np.nanmax(r[first[j]:-1, j]) - r[-1, j] if first[j] < t - 1 else 0.0 for j in range(t - 1)]))
        if untrained is not None:
            out["fwt"] = float(np.mean([r[j - 1, j] - untrained[j] for j in range(1, t)]))
    else:
        out["bwt"] = out["forgetting"] = 0.0
    return out

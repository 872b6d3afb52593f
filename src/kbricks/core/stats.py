"""Summaries over seeds: the one place where mean, standard deviation and standard error are computed."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for one value), standard error of the mean, and count."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(v) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "sem": std / math.sqrt(n), "n": n}


def mean_of(values: Sequence[float]) -> float:
    return mean_std(values)["mean"]


def summarize_runs(rows: Sequence[Mapping[str, object]]) -> Dict[str, Dict[str, float]]:
    """``mean_std`` of every numeric (non-bool) entry of the first row, over the rows that have it."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: mean_std([r[k] for r in rows if k in r]) for k in keys}


def paired_deltas(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """``a - b`` seed by seed: mean, std, s.e.m., and in how many seeds ``a`` is higher."""
    d = [x - y for x, y in zip(a, b)]
    return {**mean_std(d), "wins": sum(x > 0 for x in d)}


def fmt(stat: Optional[Mapping[str, float]], scale: float = 100.0, digits: int = 2, err: str = "std") -> str:
    """``mean ± std`` (or ``± sem``) of a ``mean_std`` summary, scaled (100 for percentages); n/a when missing."""
    if not stat:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat[err] * scale:.{digits}f}"


def fmt_values(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    return fmt(mean_std(values), scale, digits)

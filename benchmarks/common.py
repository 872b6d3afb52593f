"""Timing helpers shared by the benches: candidates alternate within every round, ratios are medians over rounds.

Each round times every candidate once (``inner`` calls, averaged), in a rotated order so no candidate always runs
first. A candidate's ratio to the baseline is computed *within* each round, then summarised over the rounds as the
median and its interquartile range (25-75 %): noise from other processes hits neighbouring samples alike and
mostly cancels in the per-round ratio.

Clock: CPU time of this process (``time.process_time``) by default, which measures the work done rather than the
time the scheduler gave us on a shared machine (the benches run with 1 intra-op thread, so CPU time is the step's
time); the wall clock is recorded beside it. ``BENCH_CLOCK=wall`` makes the wall clock the primary one (threads
bench, GPU).

Knobs: ``BENCH_ROUNDS`` (default 7, at least 5 for a reported ratio); ``BENCH_QUICK=1`` runs every code path on
tiny sizes with 2 rounds (a smoke run: the numbers mean nothing).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch


def quick() -> bool:
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def rounds(default: int = 7) -> int:
    if "BENCH_ROUNDS" in os.environ:
        return max(1, int(os.environ["BENCH_ROUNDS"]))
    return 2 if quick() else default


def clock() -> Callable[[], float]:
    return time.perf_counter if os.environ.get("BENCH_CLOCK") == "wall" else time.process_time


def clock_name() -> str:
    return "wall" if os.environ.get("BENCH_CLOCK") == "wall" else "cpu (process time)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def quartiles(values: Sequence[float]) -> List[float]:
    """[25 %, median, 75 %] (linear interpolation; one value gives three equal numbers)."""
    v = sorted(values)
    if len(v) == 1:
        return [v[0]] * 3
    q = statistics.quantiles(v, n=4, method="inclusive")
    return [q[0], statistics.median(v), q[2]]


def summary(values: Sequence[float]) -> Dict[str, object]:
    q1, med, q3 = quartiles(values)
    return {"median": med, "iqr": [q1, q3], "n": len(values)}


def time_rounds(fns: Dict[str, Callable[[], None]], baseline: str, n_rounds: int = 0, inner: int = 3,
                warmup: int = 2) -> Dict[str, Dict[str, object]]:
    """Every candidate timed in each of ``n_rounds`` rounds (order rotated per round); per candidate: ms (primary
    clock) and wall ms summaries, and the per-round ratio to ``baseline`` summarised as median [IQR]."""
    n_rounds = n_rounds or rounds()
    if quick():
        inner, warmup = 1, 1
    now = clock()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    names = list(fns)
    prim: Dict[str, list] = {k: [] for k in names}
    wall: Dict[str, list] = {k: [] for k in names}
    for r in range(n_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            t0, w0 = now(), time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            prim[name].append((now() - t0) / inner)
            wall[name].append((time.perf_counter() - w0) / inner)
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(prim[name], prim[baseline])]
        out[name] = {"ms": summary([1e3 * t for t in prim[name]]), "wall_ms": summary([1e3 * t for t in wall[name]]),
                     "ratio": summary(ratios)}
    return out


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int = 0, inner: int = 3, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each function over interleaved rounds (kept for benches that only need times)."""
    first = next(iter(fns))
    res = time_rounds(fns, first, repeats, inner, warmup)
    return {k: v["ms"]["median"] / 1e3 for k, v in res.items()}


def fmt_stat(s: Dict[str, object], digits: int = 2, suffix: str = "") -> str:
    """'1.23x [1.20–1.27]': the median and its interquartile range."""
    q1, q3 = s["iqr"]
    return f"{s['median']:.{digits}f}{suffix} [{q1:.{digits}f}–{q3:.{digits}f}]"


def report(title: str, res: Dict[str, Dict[str, object]], baseline: str, compares: str) -> Dict[str, object]:
    """Print a block and return it as stored in bench.json: what it compares (one sentence), the baseline and the
    candidates' summaries."""
    print(f"\n== {title}\n   {compares}")
    for name, r in res.items():
        print(f"  {name:<56s} {fmt_stat(r['ms'])} ms   ratio vs baseline: {fmt_stat(r['ratio'], suffix='x')}")
    return {"title": title, "compares": compares, "baseline": baseline, "candidates": res}


def plain_optimizer(o, params):
    """The optimiser ``cfg.optim`` names (name, lr, momentum, Nesterov, weight decay), in plain torch; the fused
    update where torch has one for the parameters, as kbricks uses it."""
    params = list(params)
    fused = {"fused": True} if o.name in ("sgd", "adam", "adamw") and all(p.device.type in ("cpu", "cuda") for p in params) else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, **fused)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return (torch.optim.Adam if o.name == "adam" else torch.optim.AdamW)(params, lr=o.lr, weight_decay=o.weight_decay, **fused)

"""Side-by-side timing helpers: candidates are timed interleaved in the same run, so ratios are fair."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int = 7, inner: int = 5, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each function; rounds alternate between candidates."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def report(title: str, times: Dict[str, float], baseline: str) -> Dict[str, float]:
    print(f"\n== {title}")
    for name, t in times.items():
        print(f"  {name:<48s} {t * 1e3:9.2f} ms   ratio vs {baseline}: {t / times[baseline]:.2f}x")
    return {f"{k}/ms": v * 1e3 for k, v in times.items()} | {f"{k}/ratio": v / times[baseline] for k, v in times.items()}

"""Side-by-side timing helpers: candidates are timed interleaved in the same run, so ratios are fair.

``BENCH_CLOCK=cpu`` times with the process CPU clock instead of the wall clock: on a machine shared with other
processes that measures the work done rather than the time the scheduler gave us (single-threaded runs only).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict

import torch


def clock() -> Callable[[], float]:
    return time.process_time if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int = 7, inner: int = 5, warmup: int = 2) -> Dict[str, float]:
    """Median seconds per call of each function; rounds alternate between candidates."""
    now = clock()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: Dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            for _ in range(inner):
                fn()
            sync()
            samples[name].append((now() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def report(title: str, times: Dict[str, float], baseline: str) -> Dict[str, float]:
    print(f"\n== {title}")
    for name, t in times.items():
        print(f"  {name:<48s} {t * 1e3:9.2f} ms   ratio vs {baseline}: {t / times[baseline]:.2f}x")
    return {f"{k}/ms": v * 1e3 for k, v in times.items()} | {f"{k}/ratio": v / times[baseline] for k, v in times.items()}

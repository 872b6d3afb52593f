"""Intra-op threads: 1 vs N on the machine as it is, and next to one CPU-bound neighbour process (issue 16.4).

Wall clock (the neighbour's effect is the point). Steps: the digits teacher (supervised small CNN) and KF on digits
(2 tasks), batch 64. Each round times 1 thread then N threads, interleaved; the neighbour is a Python busy loop
started for the busy rounds only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import torch
from bench_kf import first_batch, kf_step, train_teacher
from common import quick, rounds, summary

from kbricks import load_config
from kbricks.engine.experiment import build_experiment
from kbricks.studies import configs_root


def median_step(fn: Callable[[], None], threads: int, inner: int = 10) -> float:
    torch.set_num_threads(threads)
    fn()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def compare(fns: Dict[str, Callable[[], None]], many: int) -> Dict[str, list]:
    """Per candidate and thread count: one sample per round (mean of ``inner`` steps, wall clock)."""
    samples: Dict[str, list] = {}
    inner = 2 if quick() else 10
    for _ in range(rounds(5)):
        for name, fn in fns.items():
            for n in (1, many):
                samples.setdefault(f"{name}, {n} thread{'s' if n > 1 else ''}", []).append(median_step(fn, n, inner))
    return samples


def busy_neighbour() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main():
    many = 2
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = train_teacher("teacher/digits_cnn.yaml", Path(tmp) / "teacher")
        sup = build_experiment(load_config(configs_root() / "teacher/digits_cnn.yaml", []))
        kf = build_experiment(load_config(configs_root() / "kf/digits.yaml", [f"method.teacher={teacher}"]))
        fns = {"digits teacher step": kf_step(sup, first_batch(sup, 64)), "KF digits step": kf_step(kf, first_batch(kf, 64))}
        idle = compare(fns, many)
        neighbour = busy_neighbour()
        try:
            time.sleep(0.5)
            busy = compare(fns, many)
        finally:
            neighbour.kill()
            neighbour.wait()
    torch.set_num_threads(threads_before)
    out: Dict[str, dict] = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n== threads: 1 vs {many}, as the machine is (1-min load average {load:.1f} on {os.cpu_count()} cores) and with one busy neighbour")
    for name in fns:
        one = f"{name}, 1 thread"
        cands = {}
        for cond, t in (("no neighbour", idle), ("one busy neighbour", busy)):
            for key in (one, f"{name}, {many} threads"):
                cands[f"{key[len(name) + 2:]}, {cond}"] = {"ms": summary([1e3 * v for v in t[key]]),
                                                           "ratio": summary([a / b for a, b in zip(t[key], idle[one])])}
        for c, r in cands.items():
            print(f"  {name}, {c:<36s} {r['ms']['median']:8.2f} ms  {r['ratio']['median']:.2f}x")
        out[name] = {"title": f"{name}: 1 vs {many} intra-op threads, alone and next to one CPU-bound process",
                     "compares": f"Wall time of one {name} at 1 and {many} intra-op threads, with and without a busy neighbour process, "
                                 "against 1 thread alone (ratios within a round).",
                     "baseline": "1 thread, no neighbour", "candidates": cands}
    out["_meta"] = {"load_average_1min": load, "cores": os.cpu_count(), "threads_compared": many}
    return out


if __name__ == "__main__":
    main()

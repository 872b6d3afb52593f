"""Repeat a run over seeds: finished runs are reused, interrupted ones resumed, and the summary is mean +/- std."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..core import dist
from ..core.hooks import write_csv
from ..core.io import atomic_write_text
from ..core.stats import mean_std
from .experiment import load_config
from .parallel import run_parallel
from .run import run_training


def train_or_reuse(config: Path, run_dir: Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Train ``config`` into ``run_dir`` (plain or continual); reuse a finished run, resume an interrupted one."""
    done = Path(run_dir) / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = load_config(config, list(overrides) + ["train.progress=off"])
    return run_training(cfg, run_dir, resume=(Path(run_dir) / "ckpt" / "last.pt").exists())


def run_sweep(config: Path, seeds: Sequence[int], out: Path, overrides: Sequence[str] = (), paired_split: bool = True,
              workers: Optional[int] = None) -> Dict[str, Any]:
    """Train ``config`` once per seed (the seed also fixes the data split when ``paired_split``), then write
    mean +/- std of the last and the best test accuracy to ``out/sweep.json`` and ``out/sweep.csv``.

    The seeds run in ``workers`` parallel single-threaded processes (default: one per core, see
    :mod:`kbricks.engine.parallel`); under DDP (``torchrun``) they run one after the other on every rank."""
    out = Path(out)
    calls = []
    for seed in seeds:
        over = [*overrides, f"seed={seed}"] + ([f"data.kwargs.split_seed={seed}"] if paired_split else [])
        calls.append((train_or_reuse, (Path(config), out / f"seed{seed}", over), {}))
    results = run_parallel(calls, 1 if dist.is_launched() else workers)
    rows = []
    for seed, s in zip(seeds, results):
        rows.append({"seed": seed, "last_acc": s["final"]["test/acc"], "best_acc": s["best"]["test/acc"], "best_epoch": s["best"]["epoch"]})
    summary = {"config": str(config), "overrides": list(overrides), "seeds": list(seeds), "paired_split": paired_split,
               "last_acc": mean_std([r["last_acc"] for r in rows]), "best_acc": mean_std([r["best_acc"] for r in rows]), "runs": rows}
    if dist.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2), what="sweep.json")
        write_csv(out / "sweep.csv", rows)
    return summary

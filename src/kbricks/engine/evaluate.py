"""Evaluate finished runs: rebuild the experiment from a run directory's config (after importing the plugin modules
its model card records) and score a saved checkpoint; a method may give its own report (``Method.report``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..core.checkpoint import load_checkpoint, load_state_into
from ..core.io import atomic_write_text, writable_dir
from ..core.metrics import evaluate
from ..errors import KbricksError
from .card import import_recorded
from .experiment import build_experiment, load_config


def load_run(run_dir: Path, checkpoint: str = "last"):
    """The experiment of a run directory with the weights of ``ckpt/<checkpoint>.pt`` loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise KbricksError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    import_recorded(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.is_continual:
        raise KbricksError(f"{run_dir} is a continual run: its results are in results.json and accuracy_matrix.csv")
    exp = build_experiment(cfg)
    state = load_checkpoint(run_dir / "ckpt" / f"{checkpoint}.pt")
    load_state_into(exp.method, state["model"], "method")
    return exp, state


def evaluate_run(run_dir: Path, checkpoint: str = "last", baseline=None) -> Dict[str, Any]:
    """Score ``ckpt/<checkpoint>.pt`` of a run on its test split; the result is also written to the run directory
    (``eval_<checkpoint>.json``, or the method's own report files), which must be writable: checked first, so that
    no evaluation is lost to a read-only directory."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").exists():
        writable_dir(run_dir, "the run directory")
    exp, state = load_run(run_dir, checkpoint)
    report = exp.method.report(exp, run_dir, Path(baseline) if baseline else None)
    if report is not None:
        return report
    metrics = evaluate(exp.method, exp.data.test, exp.tasks, exp.transform, exp.device, exp.cfg.train.eval_batch_size)
    result = {"run_dir": str(run_dir), "checkpoint": checkpoint, "epoch": state.get("epoch"), **{f"test/{k}": v for k, v in metrics.items()}}
    atomic_write_text(run_dir / f"eval_{checkpoint}.json", json.dumps(result, indent=2), what="the evaluation")
    return result

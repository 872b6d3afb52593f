"""Evaluate a run directory: rebuild the experiment from its config and score a saved checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from .checkpoint import load_checkpoint, load_state_into
from .config import load_config
from .errors import KbricksError
from .metrics import evaluate


def evaluate_run(run_dir: Path, checkpoint: str = "last", baseline=None) -> Dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise KbricksError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    from .trainer import build_experiment

    cfg = load_config(run_dir / "config.yaml")
    if cfg.method.name == "kf":
        from .kf_report import kf_report

        return kf_report(run_dir, Path(baseline) if baseline else None, checkpoint)
    exp = build_experiment(cfg)
    state = load_checkpoint(run_dir / "ckpt" / f"{checkpoint}.pt")
    load_state_into(exp.method, state["model"], "method")
    metrics = evaluate(exp.method, exp.data.test, exp.tasks, exp.transform, exp.device, cfg.train.eval_batch_size)
    result = {"run_dir": str(run_dir), "checkpoint": checkpoint, "epoch": state.get("epoch"), **{f"test/{k}": v for k, v in metrics.items()}}
    (run_dir / f"eval_{checkpoint}.json").write_text(json.dumps(result, indent=2))
    return result

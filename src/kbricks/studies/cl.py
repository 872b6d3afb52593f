"""The continual-learning study: SupSup vs ImpressLearn on PermutedMNIST-5k or RotatedMNIST-5k over seeds."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from ..core.stats import mean_std, summarize_runs
from ..engine.sweep import train_or_reuse
from ..errors import ConfigError
from .common import configs_root, write_study

CL_QUICK = ["train.epochs=4", "inference.trials_per_task=3"]
CL_STUDY = {
    "supsup": "continual/supsup_permuted.yaml",
    "impresslearn_k3": "continual/impresslearn_permuted.yaml",
}
# RotatedMNIST with 15-degree steps: neighbouring tasks share structure (ImpressLearn's preview setting)
CL_SCENARIOS = {
    "permuted": [],
    "rotated": ["data.scenario={name: rotated, num_tasks: 5, degrees_per_task: 15}", "inference.images=[16, 128]"],
}


def run_cl_study(seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                 scenario: str = "permuted", configs: Optional[Path] = None) -> Dict[str, Any]:
    """SupSup vs ImpressLearn (5 tasks), each over ``seeds``; finished runs are reused."""
    if scenario not in CL_SCENARIOS:
        raise ConfigError(f"unknown CL study scenario {scenario!r}; valid: {', '.join(CL_SCENARIOS)}")
    root = configs_root(configs)
    out = Path(out) / "cl" / scenario
    table: Dict[str, Any] = {}
    t0 = time.time()
    for name, path in CL_STUDY.items():
        runs = []
        for seed in seeds:
            over = [*CL_SCENARIOS[scenario], *(CL_QUICK if quick else []), f"seed={seed}", f"name={name}-{scenario}"]
            runs.append(train_or_reuse(root / path, out / f"{name}-seed{seed}", over))
            log(f"[cl:{name}] seed {seed}: avg acc {runs[-1]['avg_acc']:.4f}")
        stats: Dict[str, Any] = summarize_runs(runs)
        # per-task final accuracy, to separate impression (seed) tasks from new tasks
        per_task = [mean_std([r["final_accs"][j] for r in runs]) for j in range(len(runs[0]["final_accs"]))]
        stats["final_accs_mean"] = [s["mean"] for s in per_task]
        stats["final_accs_std"] = [s["std"] for s in per_task]
        table[name] = stats
    summary = {"study": f"cl-{scenario}", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2), "methods": table}
    write_study(out / "study.json", summary)
    return summary

"""The continual-learning study: SupSup vs ImpressLearn on PermutedMNIST-5k or RotatedMNIST-5k over seeds."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..core.stats import fmt, mean_std, summarize_runs
from ..engine.sweep import train_or_reuse
from ..errors import ConfigError
from .common import configs_root, read_study, write_study
from .verdicts import Claim, Verdict

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


# ---- claims and tables ---------------------------------------------------------------------------------------


def _cl(runs: Path, scenario: str = "permuted") -> Optional[Dict[str, Any]]:
    study = read_study(runs / "cl" / scenario / "study.json")
    return study["methods"] if study else None


def cl_forgetting(runs: Path) -> Optional[Verdict]:
    m = _cl(runs)
    if not m:
        return None
    f = {k: v["forgetting"]["mean"] for k, v in m.items()}
    return ("holds" if all(x == 0.0 for x in f.values()) else "does not hold"), "forgetting: " + ", ".join(f"{k} {v:.4f}" for k, v in f.items())


def cl_params(runs: Path) -> Optional[Verdict]:
    m = _cl(runs)
    if not m:
        return None
    sup, il = m["supsup"], m["impresslearn_k3"]
    ratio_entries = sup["params_per_task"]["mean"] / il["params_per_task"]["mean"]
    ratio_bytes = sup["bytes_per_task"]["mean"] / il["bytes_per_task"]["mean"]
    text = f"SupSup {sup['params_per_task']['mean']:,.0f} mask bits vs ImpressLearn {il['params_per_task']['mean']:.0f} coefficients per task: {ratio_entries:,.0f}x fewer entries, {ratio_bytes:,.0f}x fewer bytes"
    return ("holds" if ratio_entries >= 100 and ratio_bytes >= 100 else "partly"), text


def cl_accuracy(runs: Path, scenario: str = "permuted") -> Optional[Verdict]:
    m = _cl(runs, scenario)
    if not m:
        return None
    sup, il = m["supsup"], m["impresslearn_k3"]
    gap = 100 * (sup["avg_acc"]["mean"] - il["avg_acc"]["mean"])
    new = [100 * (a - b) for a, b in zip(sup["final_accs_mean"][3:], il["final_accs_mean"][3:])]
    text = (f"avg acc SupSup {100 * sup['avg_acc']['mean']:.2f} vs ImpressLearn (k=3) {100 * il['avg_acc']['mean']:.2f} (gap {gap:.2f}); "
            f"on the new tasks (not impressions) the gap is {', '.join(f'{g:.1f}' for g in new)} points")
    return ("holds" if gap <= 2 else ("partly" if gap <= 5 else "does not hold")), text


def cl_inference(runs: Path) -> Optional[Verdict]:
    m = _cl(runs)
    if not m or "task_inference/one_shot/16img" not in m["supsup"]:
        return None
    s = m["supsup"]
    one, sixteen = s["task_inference/one_shot/1img"]["mean"], s["task_inference/one_shot/16img"]["mean"]
    text = f"SupSup one-shot task id accuracy: 1 image {100 * one:.1f}%, 16 images {100 * sixteen:.1f}%"
    return ("holds" if sixteen >= 0.99 and one >= 0.85 else ("partly" if sixteen >= 0.9 else "does not hold")), text


CL_CLAIMS: List[Claim] = [
    Claim("SupSup/ImpressLearn", "No forgetting: old tasks are unchanged by later tasks (both methods)", cl_forgetting),
    Claim("ImpressLearn", "Orders of magnitude fewer parameters per task than SupSup", cl_params),
    Claim("ImpressLearn", "A combination of a few impressions is comparable to a dedicated mask; issue bar: within 2 points of SupSup, PermutedMNIST-5k", cl_accuracy),
    Claim("ImpressLearn", "Same on related tasks: RotatedMNIST-5k with 15° steps (the paper's preview setting)", lambda runs: cl_accuracy(runs, "rotated")),
    Claim("SupSup", "One-shot task inference identifies the task (notebook: 100% from 1 image on PermutedMNIST)", cl_inference),
]


def section(runs: Path) -> List[str]:
    lines: List[str] = []
    for scenario, title, images in (("permuted", "PermutedMNIST-5k", (1, 16)), ("rotated", "RotatedMNIST-5k, 15° steps", (16, 128))):
        lines += cl_table(runs, scenario, title, images)
    return lines


def cl_table(runs: Path, scenario: str, title: str, images) -> List[str]:
    study = read_study(runs / "cl" / scenario / "study.json")
    if not study:
        return []
    rows = study["methods"]
    n = len(study["seeds"])
    a, b = images
    lines = [f"## Continual learning: SupSup vs ImpressLearn on {title}", "",
             f"5 tasks, MLP 784-300-100-10 at density 0.5, {n} seeds (mean ± std). ImpressLearn k=3: the impressions are the "
             "masks of tasks 1-3; tasks 4-5 are new and get only 3 coefficients per layer.", "",
             f"| method | avg accuracy % | forgetting | BWT | stored per task | bytes per task | task-id acc one-shot ({a} / {b} img) % | task-id acc binary ({a} / {b} img) % | GN acc {b} img % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {fmt(s['avg_acc'])} | {s['forgetting']['mean']:.4f} | {s['bwt']['mean']:.4f} | {s['params_per_task']['mean']:,.0f} | "
            f"{s['bytes_per_task']['mean']:,.0f} | {fmt(s.get(f'task_inference/one_shot/{a}img'))} / {fmt(s.get(f'task_inference/one_shot/{b}img'))} | "
            f"{fmt(s.get(f'task_inference/binary/{a}img'))} / {fmt(s.get(f'task_inference/binary/{b}img'))} | {fmt(s.get(f'gn_acc/one_shot/{b}img'))} |")
    lines += ["", "Final accuracy per task (%, mean over seeds):", "", "| method | " + " | ".join(f"task {i + 1}" for i in range(len(next(iter(rows.values()))["final_accs_mean"]))) + " |",
              "|---|" + "---|" * len(next(iter(rows.values()))["final_accs_mean"])]
    for name, s in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * a:.2f}" for a in s["final_accs_mean"]) + " |")
    return lines + [""]


def copy_plots(runs: Path, dest: Path) -> None:
    """Accuracy matrix and curves of seed 0 of each CL study run, when its run directory is present."""
    for scenario in CL_SCENARIOS:
        for name in CL_STUDY:
            for kind in ("accuracy_matrix", "accuracy_curves"):
                src = runs / "cl" / scenario / f"{name}-seed0" / "plots" / f"{kind}.png"
                if src.exists():
                    shutil.copy(src, dest / f"cl_{scenario}_{name}_{kind}.png")

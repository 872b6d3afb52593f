"""The SSKT study: scratch, KD (target-trained teacher), KD (mismatched source), DML, MAXL, SSKT (I) and
SSKT (I+P) on the few-label digits target, over paired seeds (each seed fixes the split and the initialisation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..core.stats import fmt, mean_std, paired_deltas
from ..engine.sweep import run_sweep, train_or_reuse
from .common import configs_root, write_study

SSKT_QUICK = ["train.epochs=30", "train.eval_every=15", "train.checkpoint_every=30"]


def sskt_methods(sources: Dict[str, Path]) -> Dict[str, List[str]]:
    """Overrides on configs/sskt/digits10_scratch.yaml for every method of the SSKT comparison."""
    src_i, src_p = str(sources["mnist8"]), str(sources["shapes8"])
    return {
        "scratch": [],
        "kd_teacher": ["method.name=kd", "method.temperature=4", "method.alpha=0.9"],  # teacher set per seed
        "kd_source": ["method.name=kd", f"method.teacher={src_i}", "method.temperature=4", "method.alpha=0.9"],
        "dml": ["method.name=dml"],
        "maxl": ["method.name=maxl"],
        "sskt_I": ["method.name=sskt", f"method.sources=[{src_i}]"],
        "sskt_I+P": ["method.name=sskt", f"method.sources=[{src_i}, {src_p}]"],
    }


def run_sskt_study(seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                   configs: Optional[Path] = None) -> Dict[str, Any]:
    root = configs_root(configs)
    out = Path(out) / "sskt"
    quick_over = SSKT_QUICK if quick else []
    sources = {"mnist8": out / "sources" / "mnist8", "shapes8": out / "sources" / "shapes8"}
    src_acc = {}
    for name, cfg in (("mnist8", "sources/mnist8_cnn.yaml"), ("shapes8", "sources/shapes8_cnn.yaml")):
        src_acc[name] = train_or_reuse(root / cfg, sources[name], ["train.epochs=3"] if quick else [])["final"]["test/acc"]
    base = root / "sskt" / "digits10_scratch.yaml"
    results: Dict[str, Any] = {}
    t0 = time.time()
    # KD's teacher: a 3x wider network trained on the same few labels, one per seed (paired)
    teacher_runs = out / "kd_teacher_nets"
    teacher_acc = []
    for seed in seeds:
        s = train_or_reuse(base, teacher_runs / f"seed{seed}", [*quick_over, "model.kwargs.width=48", f"seed={seed}", f"data.kwargs.split_seed={seed}"])
        teacher_acc.append(s["final"]["test/acc"])
    for name, over in sskt_methods(sources).items():
        if name == "kd_teacher":
            runs = [run_sweep(base, [seed], out / name / f"s{seed}", [*over, *quick_over, f"method.teacher={teacher_runs / f'seed{seed}'}"])["runs"][0]
                    for seed in seeds]
            results[name] = {"runs": runs, "last_acc": mean_std([r["last_acc"] for r in runs]), "best_acc": mean_std([r["best_acc"] for r in runs])}
        else:
            results[name] = run_sweep(base, seeds, out / name, [*over, *quick_over])
        log(f"[sskt] {name}: {fmt(results[name]['last_acc'])}")
    scratch = [r["last_acc"] for r in results["scratch"]["runs"]]
    for res in results.values():
        d = paired_deltas([r["last_acc"] for r in res["runs"]], scratch)
        res["delta_vs_scratch"] = {"mean": d["mean"], "sem": d["sem"], "wins": d["wins"], "n": d["n"]}
    summary = {"study": "sskt-digits10", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2),
               "source_acc": src_acc, "kd_teacher_acc": mean_std(teacher_acc), "methods": results}
    write_study(out / "study.json", summary)
    return summary

"""The SSKT study: scratch, KD (target-trained teacher), KD (mismatched source), DML, MAXL, SSKT (I), SSKT (I+P)
with linear auxiliary heads (the pre-registered configuration) and SSKT (I+P) with the transfer module, on the
few-label digits target, over paired seeds (each seed fixes the split and the initialisation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..core.stats import fmt, fmt_values, mean_of, mean_std, paired_deltas
from ..engine.sweep import run_sweep, train_or_reuse
from .common import configs_root, read_study, write_study
from .verdicts import Claim, Verdict, grade

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
        "sskt_I+P_TM": ["method.name=sskt", f"method.sources=[{src_i}, {src_p}]", "method.transfer_module=true"],
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


# ---- claims and tables ---------------------------------------------------------------------------------------


def _sskt(runs: Path) -> Optional[Dict[str, Any]]:
    study = read_study(runs / "sskt" / "study.json")
    return study["methods"] if study else None


def sskt_vs(other: str, want_better: bool = True, ours: str = "sskt_I+P") -> Callable[[Path], Optional[Verdict]]:
    """Paired seeds: holds when the mean difference is in the claimed direction, exceeds one s.e.m., and is in that
    direction in >= 60% of the seeds; partly when only the mean is in the claimed direction."""
    def check(runs: Path) -> Optional[Verdict]:
        m = _sskt(runs)
        if not m or ours not in m or other not in m:
            return None
        a = [r["last_acc"] for r in m[ours]["runs"]]
        b = [r["last_acc"] for r in m[other]["runs"]]
        d = [x - y for x, y in zip(a, b)]
        wins = sum(x > 0 for x in d)
        sem = mean_std(d)["sem"]
        text = f"{LABELS[ours]} − {LABELS[other]} = {100 * mean_of(d):+.2f} ± {100 * sem:.2f} (s.e.m.), better in {wins}/{len(d)} paired seeds"
        mean_ok = mean_of(d) > 0 if want_better else mean_of(d) < 0
        strong = mean_ok and abs(mean_of(d)) > sem and (wins >= 0.6 * len(d) if want_better else wins <= 0.4 * len(d))
        return grade(strong, mean_ok), text
    return check


def kd_source_control(runs: Path) -> Optional[Verdict]:
    m = _sskt(runs)
    if not m:
        return None
    d = [a["last_acc"] - b["last_acc"] for a, b in zip(m["kd_source"]["runs"], m["scratch"]["runs"])]
    text = f"KD from the cross-domain source − scratch = {fmt_values(d)} points; SSKT with the same source − scratch = {fmt_values([a['last_acc'] - b['last_acc'] for a, b in zip(m['sskt_I']['runs'], m['scratch']['runs'])])}"
    return grade(all(x < 0 for x in d), mean_of(d) < 0), text


LABELS = {"scratch": "scratch", "kd_teacher": "KD (target-trained teacher)", "kd_source": "KD from source I", "dml": "DML",
          "maxl": "MAXL", "sskt_I": "SSKT (I)", "sskt_I+P": "SSKT (I+P)", "sskt_I+P_TM": "SSKT (I+P, transfer module)"}

SSKT_CLAIMS: List[Claim] = [
    Claim("SSKT", "SSKT improves over training from scratch on a small target", sskt_vs("scratch")),
    Claim("SSKT", "Same with the transfer module (multi-stage auxiliary heads, the paper's TM)", sskt_vs("scratch", ours="sskt_I+P_TM")),
    Claim("SSKT", "The transfer module helps over linear auxiliary heads (paper: most on small, hard targets such as STL10)",
          sskt_vs("sskt_I+P", ours="sskt_I+P_TM")),
    Claim("SSKT", "SSKT beats KD from a teacher trained on the target", sskt_vs("kd_teacher")),
    Claim("SSKT", "SSKT beats MAXL", sskt_vs("maxl")),
    Claim("SSKT", "SSKT beats DML", sskt_vs("dml")),
    Claim("SSKT", "A mismatched source used as a KD teacher hurts; the auxiliary head makes it safe", kd_source_control),
]


def section(runs: Path) -> List[str]:
    lines = sskt_table(runs)
    return ["## SSKT vs baselines on the few-label digits target", "", *lines] if lines else []


def reproduction_tables(runs: Path) -> List[str]:
    lines = sskt_table(runs)
    return ["### SSKT vs baselines (few-label digits)", "", *lines] if lines else []


def sskt_table(runs: Path) -> List[str]:
    study = read_study(runs / "sskt" / "study.json")
    if not study:
        return []
    n = len(study["seeds"])
    lines = [f"sklearn digits, 10 labelled images per class, the other ~1,700 images as test; ResNet-8 target (78k parameters), "
             f"450 SGD steps; {n} paired seeds (each seed fixes the labelled split and the initialisation). "
             f"Sources: MNIST-5k at 8x8 ({100 * study['source_acc']['mnist8']:.1f}% on its own test set), shapes x size "
             f"({100 * study['source_acc']['shapes8']:.1f}%); KD teacher: a 3x wider net on the same labels ({fmt(study['kd_teacher_acc'])}%). "
             f"Wall time {study['minutes']:.0f} minutes.", "",
             "| method | last-epoch accuracy % | best accuracy % | Δ vs scratch (paired, ± s.e.m.) | seeds better than scratch |", "|---|---|---|---|---|"]
    for name, r in study["methods"].items():
        d = r["delta_vs_scratch"]
        lines.append(f"| {LABELS.get(name, name)} | {fmt(r['last_acc'])} | {fmt(r['best_acc'])} | {100 * d['mean']:+.2f} ± {100 * d['sem']:.2f} | {d['wins']}/{d['n']} |")
    return lines + [""]

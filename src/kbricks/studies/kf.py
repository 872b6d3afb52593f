"""The KF study: for each seed, train the teacher, factorize it (KF), distil a same-size KD student, and report
(factor vs teacher vs KD, assembly from the brick store, MIG, probes)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..core import dist
from ..core.stats import fmt, fmt_values, mean_of, mean_std, summarize_runs
from ..engine.evaluate import evaluate_run
from ..engine.sweep import train_or_reuse
from ..errors import ConfigError
from .common import configs_root, read_study, write_study
from .verdicts import Claim, Verdict, grade

# --quick budgets: small enough for `kbricks reproduce --quick`, large enough to mean something
KF_QUICK = {
    "digits": ["train.epochs=12"],
    "mnist5k": ["train.epochs=3", "data.train_subset=2000"],
    "dsprites": ["train.epochs=6", "data.kwargs.n_samples=3000"],
}

KF_STUDIES = {
    "digits": ("teacher/digits_cnn.yaml", "kf/digits.yaml", "kd/digits_student.yaml"),
    "mnist5k": ("teacher/mnist5k_cnn.yaml", "kf/mnist5k.yaml", "kd/mnist5k_student.yaml"),
    "dsprites": ("teacher/dsprites_multihead.yaml", "kf/dsprites.yaml", "kd/dsprites_student.yaml"),
}


def run_kf_study(dataset: str, seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                 configs: Optional[Path] = None) -> Dict[str, Any]:
    if dataset not in KF_STUDIES:
        raise ConfigError(f"unknown KF study {dataset!r}; valid: {', '.join(KF_STUDIES)}")
    root = configs_root(configs)
    teacher_cfg, kf_cfg, kd_cfg = (root / p for p in KF_STUDIES[dataset])
    quick_over = KF_QUICK[dataset] if quick else []
    out = Path(out) / "kf" / dataset
    reports: List[Dict[str, Any]] = []
    t0 = time.time()
    for seed in seeds:
        seed_over = [f"seed={seed}", *quick_over]
        teacher_dir = out / f"teacher-seed{seed}"
        train_or_reuse(teacher_cfg, teacher_dir, seed_over)
        teach = [f"method.teacher={teacher_dir}"]
        train_or_reuse(kf_cfg, out / f"kf-seed{seed}", seed_over + teach)
        train_or_reuse(kd_cfg, out / f"kd-seed{seed}", seed_over + teach)
        if dist.is_main_process():
            reports.append(evaluate_run(out / f"kf-seed{seed}", baseline=out / f"kd-seed{seed}"))
            log(f"[kf:{dataset}] seed {seed}: teacher {reports[-1]['teacher/acc']:.4f} assembled {reports[-1]['assembled/acc']:.4f}")
    summary = {"study": f"kf-{dataset}", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2),
               "metrics": summarize_runs(reports) if reports else {}}
    if dist.is_main_process():
        write_study(out / "study.json", {"summary": summary, "reports": reports})
    return summary


# ---- claims and tables ---------------------------------------------------------------------------------------


def _kf_reports(runs: Path, dataset: str) -> Optional[List[Dict[str, Any]]]:
    study = read_study(runs / "kf" / dataset / "study.json")
    return study["reports"] if study else None


def kf_factor_claim(dataset: str) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _kf_reports(runs, dataset)
        if not reps:
            return None
        gaps = [max(r[f"teacher/acc_{t}"] - r[f"kf/acc_{t}"] for t in r["tasks"]) for r in reps]
        text = f"worst task: teacher − factor = {fmt_values(gaps)} points ({len(reps)} seeds)"
        return grade(all(g <= 0.01 for g in gaps), mean_of(gaps) <= 0.01), text
    return check


def kf_assembled_claim(dataset: str) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _kf_reports(runs, dataset)
        if not reps:
            return None
        d = [r["assembled/acc"] - r["teacher/acc"] for r in reps]
        same = all(r["assembled_matches_factors"] for r in reps)
        text = f"assembled − teacher = {fmt_values(d)} points; assembled from bricks == trained factors: {same}"
        return grade(all(x >= -0.01 for x in d) and same, mean_of(d) >= -0.01), text
    return check


def kf_pair_claim(key_kf: str, key_kd: str, label: str, scale: float = 100.0, digits: int = 2) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _kf_reports(runs, "dsprites")
        if not reps or key_kf not in reps[0]:
            return None
        kf, kd = [r[key_kf] for r in reps], [r[key_kd] for r in reps]
        diff = [a - b for a, b in zip(kf, kd)]
        return grade(all(x > 0 for x in diff), mean_of(diff) > 0), f"{label}: KF {fmt_values(kf, scale, digits)} vs KD {fmt_values(kd, scale, digits)} (higher in KF in {sum(x > 0 for x in diff)}/{len(diff)} seeds)"
    return check


KF_CLAIMS: List[Claim] = [
    Claim("KF", "Each factor network performs on par with the teacher on its task (ECCV'22); issue bar: within 1 point, digits", kf_factor_claim("digits")),
    Claim("KF", "Same, MNIST-5k", kf_factor_claim("mnist5k")),
    Claim("KF", "Factor networks assemble into a multi-task network without fine-tuning; issue bar: within 1 point of the teacher, digits", kf_assembled_claim("digits")),
    Claim("KF", "Same, MNIST-5k", kf_assembled_claim("mnist5k")),
    Claim("KF", "Task-specific representations are more disentangled than a KD student's (dSprites; MIG)", kf_pair_claim("kf/mig", "kd/mig", "MIG (0-1)", 1.0, 3)),
    Claim("KF", "Common knowledge transfers better than KD-student features (linear probe of held-out pos_x)", kf_pair_claim("transfer/kf_ckn/pos_x", "transfer/kd/pos_x", "probe pos_x %")),
    Claim("KF", "Same for pos_y", kf_pair_claim("transfer/kf_ckn/pos_y", "transfer/kd/pos_y", "probe pos_y %")),
]


def section(runs: Path) -> List[str]:
    lines = ["## Knowledge Factorization", ""]
    for dataset in ("digits", "mnist5k", "dsprites"):
        study = read_study(runs / "kf" / dataset / "study.json")
        if not study:
            continue
        m = study["summary"]["metrics"]
        n = len(study["summary"]["seeds"])
        tasks = study["reports"][0]["tasks"]
        lines += [f"### {dataset} ({n} seeds, mean ± std, test accuracy %)", "",
                  "| | teacher | KF factor network | KD student (same size) |", "|---|---|---|---|"]
        for t in tasks:
            lines.append(f"| task `{t}` | {fmt(m.get(f'teacher/acc_{t}'))} | {fmt(m.get(f'kf/acc_{t}'))} | {fmt(m.get(f'kd/acc_{t}'))} |")
        label = "all 10 classes (assembled, no fine-tuning)" if dataset != "dsprites" else "mean over tasks (assembled)"
        lines.append(f"| {label} | {fmt(m.get('teacher/acc'))} | {fmt(m.get('assembled/acc'))} | {fmt(m.get('kd/acc'))} |")
        lines.append(f"| parameters | {m['teacher/params']['mean']:,.0f} | {m['kf/params']['mean']:,.0f} | {m['kd/params']['mean']:,.0f} |")
        same = all(r["assembled_matches_factors"] for r in study["reports"])
        lines += ["", f"Assembled from the brick store == trained factor networks in every seed: **{same}**."]
        gaps = [max(abs(r[f"kf/acc_{t}"] - r[f"teacher/acc_{t}"]) for t in tasks) for r in study["reports"]]
        lines.append(f"Largest per-task gap |factor - teacher| over seeds: {100 * max(gaps):.2f} points; "
                     f"assembled - teacher: {fmt(_diff(study['reports'], 'assembled/acc', 'teacher/acc'))} points.")
        if "kf/mig" in m:
            lines += ["", "| representation | MIG vs task latents | linear probe pos_x | linear probe pos_y |", "|---|---|---|---|",
                      f"| KF task codes (TSN means) / CKN features | {fmt(m['kf/mig'], 1, 3)} | {fmt(m.get('transfer/kf_ckn/pos_x'))} | {fmt(m.get('transfer/kf_ckn/pos_y'))} |",
                      f"| KD student features (PCA to the same size for MIG) | {fmt(m['kd/mig'], 1, 3)} | {fmt(m.get('transfer/kd/pos_x'))} | {fmt(m.get('transfer/kd/pos_y'))} |",
                      f"| teacher features (trained on positions too: a ceiling) | | {fmt(m.get('transfer/teacher/pos_x'))} | {fmt(m.get('transfer/teacher/pos_y'))} |"]
        lines.append("")
    return lines


def _diff(reports, a: str, b: str) -> Dict[str, float]:
    return mean_std([r[a] - r[b] for r in reports])




def copy_plots(runs: Path, dest: Path) -> None:
    """Training curves of seed 0 of each KF study, when its run directory is present."""
    for dataset in ("digits", "mnist5k", "dsprites"):
        src = runs / "kf" / dataset / "kf-seed0" / "plots" / "curves.png"
        if src.exists():
            shutil.copy(src, dest / f"kf_{dataset}_curves.png")

"""The KF study: for each seed, train the teacher, factorize it (KF), distil a same-size KD student, and report
(factor vs teacher vs KD, assembly from the brick store, MIG, probes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..core import dist
from ..core.stats import summarize_runs
from ..engine.evaluate import evaluate_run
from ..engine.sweep import train_or_reuse
from ..errors import ConfigError
from .common import configs_root, write_study

# --quick budgets: small enough for `kbricks reproduce --quick`, large enough to mean something
KF_QUICK = {
    "digits": ["train.epochs=12"],
    "mnist5k": ["train.epochs=3", "data.train_subset=2000"],
    "dsprites": ["train.epochs=3", "data.kwargs.n_samples=1500"],
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

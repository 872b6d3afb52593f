"""Multi-seed studies built from shipped configs: teacher -> method -> baseline -> report, mean +/- std.

Every run directory is reused when it already finished and resumed when it was cut off, so a study that is
interrupted picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import dist
from .config import load_config
from .errors import ConfigError


def configs_root() -> Path:
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else Path.cwd() / "configs"


def train_or_reuse(config: Path, run_dir: Path, overrides: Sequence[str]) -> Dict[str, Any]:
    """Train ``config`` into ``run_dir``; reuse a finished run, resume an interrupted one."""
    from .trainer import run_training

    done = run_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = load_config(config, list(overrides) + ["train.progress=off"])
    return run_training(cfg, run_dir, resume=(run_dir / "ckpt" / "last.pt").exists())


KF_STUDIES = {
    "digits": ("teacher/digits_cnn.yaml", "kf/digits.yaml", "kd/digits_student.yaml"),
    "mnist5k": ("teacher/mnist5k_cnn.yaml", "kf/mnist5k.yaml", "kd/mnist5k_student.yaml"),
    "dsprites": ("teacher/dsprites_multihead.yaml", "kf/dsprites.yaml", "kd/dsprites_student.yaml"),
}


def run_kf_study(dataset: str, seeds: Sequence[int], out: Path, quick: bool = False,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """For each seed: train the teacher, factorize it (KF), distil a same-size KD student, report."""
    from .kf_report import kf_report, summarize_seeds

    if dataset not in KF_STUDIES:
        raise ConfigError(f"unknown KF study {dataset!r}; valid: {', '.join(KF_STUDIES)}")
    root = configs_root()
    teacher_cfg, kf_cfg, kd_cfg = (root / p for p in KF_STUDIES[dataset])
    quick_over = ["train.epochs=3"] if quick else []
    out = Path(out) / dataset
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
            reports.append(kf_report(out / f"kf-seed{seed}", baseline=out / f"kd-seed{seed}"))
            log(f"[kf:{dataset}] seed {seed}: teacher {reports[-1]['teacher/acc']:.4f} assembled {reports[-1]['assembled/acc']:.4f}")
    summary = {"study": f"kf-{dataset}", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2),
               "metrics": summarize_seeds(reports) if reports else {}}
    if dist.is_main_process():
        (out / "study.json").write_text(json.dumps({"summary": summary, "reports": reports}, indent=2))
    return summary


def fmt(stat: Optional[Dict[str, float]], scale: float = 100.0, digits: int = 2) -> str:
    if not stat:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"

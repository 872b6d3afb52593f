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
from .metrics import mean_std, summarize_runs


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


# --quick budgets: small enough for `kbricks reproduce --quick` (< 10 min on 2 cores), large enough to mean something
KF_QUICK = {
    "digits": ["train.epochs=12"],
    "mnist5k": ["train.epochs=3", "data.train_subset=2000"],
    "dsprites": ["train.epochs=3", "data.kwargs.n_samples=1500"],
}
CL_QUICK = ["train.steps_per_task=100", "inference.trials_per_task=3"]
SSKT_QUICK = ["train.epochs=30", "train.eval_every=15", "train.checkpoint_every=30"]

KF_STUDIES = {
    "digits": ("teacher/digits_cnn.yaml", "kf/digits.yaml", "kd/digits_student.yaml"),
    "mnist5k": ("teacher/mnist5k_cnn.yaml", "kf/mnist5k.yaml", "kd/mnist5k_student.yaml"),
    "dsprites": ("teacher/dsprites_multihead.yaml", "kf/dsprites.yaml", "kd/dsprites_student.yaml"),
}


def run_kf_study(dataset: str, seeds: Sequence[int], out: Path, quick: bool = False,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """For each seed: train the teacher, factorize it (KF), distil a same-size KD student, report."""
    from .kf_report import kf_report

    if dataset not in KF_STUDIES:
        raise ConfigError(f"unknown KF study {dataset!r}; valid: {', '.join(KF_STUDIES)}")
    root = configs_root()
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
            reports.append(kf_report(out / f"kf-seed{seed}", baseline=out / f"kd-seed{seed}"))
            log(f"[kf:{dataset}] seed {seed}: teacher {reports[-1]['teacher/acc']:.4f} assembled {reports[-1]['assembled/acc']:.4f}")
    summary = {"study": f"kf-{dataset}", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2),
               "metrics": summarize_runs(reports) if reports else {}}
    if dist.is_main_process():
        (out / "study.json").write_text(json.dumps({"summary": summary, "reports": reports}, indent=2))
    return summary


def fmt(stat: Optional[Dict[str, float]], scale: float = 100.0, digits: int = 2) -> str:
    if not stat:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


CL_STUDY = {
    "supsup": ("continual/supsup_permuted.yaml", []),
    "impresslearn_k3": ("continual/impresslearn_permuted.yaml", []),
}
# RotatedMNIST with 15-degree steps: neighbouring tasks share structure (ImpressLearn's preview setting)
CL_ROTATED = ["scenario.name=rotated", "scenario.degrees_per_task=15", "inference.images=[16, 128]"]


def run_cl_study(seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                 scenario: str = "permuted") -> Dict[str, Any]:
    """SupSup vs ImpressLearn (5 tasks of PermutedMNIST-5k, or RotatedMNIST-5k with ``scenario="rotated"``),
    each over ``seeds``; finished runs are reused."""
    import torch

    from .continual.runner import load_continual_config, run_continual

    if scenario not in ("permuted", "rotated"):
        raise ConfigError(f"unknown CL study scenario {scenario!r}; valid: permuted, rotated")
    out = Path(out) / "cl" / scenario
    quick_over = CL_QUICK if quick else []
    table: Dict[str, Any] = {}
    t0 = time.time()
    for name, (path, over) in CL_STUDY.items():
        runs = []
        for seed in seeds:
            run_dir = out / f"{name}-seed{seed}"
            done = run_dir / "results.json"
            if done.exists():
                runs.append(json.loads(done.read_text()))
                continue
            scen = CL_ROTATED if scenario == "rotated" else []
            cfg = load_continual_config(configs_root() / path, [*over, *scen, *quick_over, f"seed={seed}", "plots=true", f"name={name}-{scenario}"])
            runs.append(run_continual(cfg, run_dir, resume=(run_dir / "ckpt" / "last.pt").exists()))
            log(f"[cl:{name}] seed {seed}: avg acc {runs[-1]['avg_acc']:.4f}")
        stats = summarize_runs(runs)
        # per-task final accuracy, to separate impression (seed) tasks from new tasks
        finals = torch.tensor([r["final_accs"] for r in runs], dtype=torch.float64)
        stats["final_accs_mean"] = finals.mean(0).tolist()
        stats["final_accs_std"] = (finals.std(0) if len(runs) > 1 else torch.zeros(finals.shape[1])).tolist()
        table[name] = stats
    summary = {"study": f"cl-{scenario}", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2), "methods": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_sweep(config: Path, seeds: Sequence[int], out: Path, overrides: Sequence[str] = (), paired_split: bool = True) -> Dict[str, Any]:
    """Train ``config`` once per seed (the seed also fixes the data split when ``paired_split``), then write
    mean +/- std of the last and the best test accuracy to ``out/sweep.json`` and ``out/sweep.csv``."""
    from .hooks import write_csv

    out = Path(out)
    rows = []
    for seed in seeds:
        over = [*overrides, f"seed={seed}"] + ([f"data.kwargs.split_seed={seed}"] if paired_split else [])
        s = train_or_reuse(Path(config), out / f"seed{seed}", over)
        rows.append({"seed": seed, "last_acc": s["final"]["test/acc"], "best_acc": s["best"]["test/acc"], "best_epoch": s["best"]["epoch"]})
    summary = {"config": str(config), "overrides": list(overrides), "seeds": list(seeds), "paired_split": paired_split,
               "last_acc": mean_std([r["last_acc"] for r in rows]), "best_acc": mean_std([r["best_acc"] for r in rows]), "runs": rows}
    if dist.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(summary, indent=2))
        write_csv(out / "sweep.csv", rows)
    return summary


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


def run_sskt_study(seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Scratch, KD (target-trained teacher), KD (mismatched source), DML, MAXL, SSKT (I) and SSKT (I+P) on the
    digits few-label target, over paired seeds (each seed fixes the split and the initialisation)."""
    root = configs_root()
    out = Path(out) / "sskt"
    quick_over = SSKT_QUICK if quick else []
    sources = {
        "mnist8": out / "sources" / "mnist8",
        "shapes8": out / "sources" / "shapes8",
    }
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
            runs = []
            for seed in seeds:
                runs.append(run_sweep(base, [seed], out / name / f"s{seed}", [*over, *quick_over, f"method.teacher={teacher_runs / f'seed{seed}'}"])["runs"][0])
            results[name] = {"runs": runs, "last_acc": mean_std([r["last_acc"] for r in runs]), "best_acc": mean_std([r["best_acc"] for r in runs])}
        else:
            results[name] = run_sweep(base, seeds, out / name, [*over, *quick_over])
        log(f"[sskt] {name}: {fmt(results[name]['last_acc'])}")
    scratch = [r["last_acc"] for r in results["scratch"]["runs"]]
    for res in results.values():
        deltas = [r["last_acc"] - s for r, s in zip(res["runs"], scratch)]
        st = mean_std(deltas)
        res["delta_vs_scratch"] = {"mean": st["mean"], "sem": st["std"] / max(1, len(deltas)) ** 0.5, "wins": sum(d > 0 for d in deltas), "n": len(deltas)}
    summary = {"study": "sskt-digits10", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2),
               "source_acc": src_acc, "kd_teacher_acc": mean_std(teacher_acc), "methods": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    return summary

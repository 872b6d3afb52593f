"""Turn the studies' ``study.json`` files into results/RESULTS.md (markdown tables) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from ..core.stats import fmt, mean_std
from .common import read_study as _load


def kf_section(runs: Path) -> List[str]:
    lines = ["## Knowledge Factorization", ""]
    for dataset in ("digits", "mnist5k", "dsprites"):
        study = _load(runs / "kf" / dataset / "study.json")
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


def cl_section(runs: Path) -> List[str]:
    lines: List[str] = []
    for scenario, title, images in (("permuted", "PermutedMNIST-5k", (1, 16)), ("rotated", "RotatedMNIST-5k, 15° steps", (16, 128))):
        lines += cl_table(runs, scenario, title, images)
    return lines


def cl_table(runs: Path, scenario: str, title: str, images) -> List[str]:
    study = _load(runs / "cl" / scenario / "study.json")
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


def sskt_section(runs: Path) -> List[str]:
    study = _load(runs / "sskt" / "study.json")
    if not study:
        return []
    n = len(study["seeds"])
    lines = ["## SSKT vs baselines on the few-label digits target", "",
             f"sklearn digits, 10 labelled images per class, the other ~1,700 images as test; ResNet-8 target (78k parameters), "
             f"450 SGD steps; {n} paired seeds (each seed fixes the labelled split and the initialisation). "
             f"Sources: MNIST-5k at 8x8 ({100 * study['source_acc']['mnist8']:.1f}% on its own test set), shapes x size "
             f"({100 * study['source_acc']['shapes8']:.1f}%); KD teacher: a 3x wider net on the same labels ({fmt(study['kd_teacher_acc'])}%).", "",
             "| method | last-epoch accuracy % | best accuracy % | Δ vs scratch (paired, ± s.e.m.) | seeds better than scratch |", "|---|---|---|---|---|"]
    for name, r in study["methods"].items():
        d = r["delta_vs_scratch"]
        lines.append(f"| {name} | {fmt(r['last_acc'])} | {fmt(r['best_acc'])} | {100 * d['mean']:+.2f} ± {100 * d['sem']:.2f} | {d['wins']}/{d['n']} |")
    return lines + [""]


def write_results(runs: Path, out: Path) -> Path:
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = ["# kbricks results", "",
            "Generated by `kbricks report` from the studies' `study.json` files (`kbricks study ...`). CPU, 2 cores.", ""]
    body += kf_section(runs) + cl_section(runs) + sskt_section(runs)
    copy_plots(runs, out / "plots")
    plots = sorted((out / "plots").glob("*.png"))
    if plots:
        body += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path = out / "RESULTS.md"
    path.write_text("\n".join(body))
    return path


def copy_plots(runs: Path, dest: Path) -> None:
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for scenario in ("permuted", "rotated"):
        for name in ("supsup", "impresslearn_k3"):
            for kind in ("accuracy_matrix", "accuracy_curves"):
                src = runs / "cl" / scenario / f"{name}-seed0" / "plots" / f"{kind}.png"
                if src.exists():
                    shutil.copy(src, dest / f"cl_{scenario}_{name}_{kind}.png")
    for dataset in ("digits", "mnist5k", "dsprites"):
        src = runs / "kf" / dataset / "kf-seed0" / "plots" / "curves.png"
        if src.exists():
            shutil.copy(src, dest / f"kf_{dataset}_curves.png")

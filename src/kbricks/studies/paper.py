"""Paper-scale recipes: the seed papers' own set-ups on CIFAR-10/100 as shipped configs (``configs/paper/``), run by
``kbricks reproduce --scale paper --data-root DIR`` for every recipe whose data are present under DIR.

A recipe is a chain of runs: a teacher, then KF and its same-size KD student; SupSup or ImpressLearn on
SplitCIFAR100; two ImageFolder sources, then SSKT and its baselines (scratch, KD, DML, MAXL). Teachers and sources
are trained once (seed 0) and shared by every seed and recipe that uses them; every other run is repeated per
seed. A recipe whose data are missing is skipped with the files it needs and where they go (:data:`DATA`); when no
recipe can run, the study stops with one line naming the missing files. The paper's number sits next to ours in
``<out>/PAPER-SCALE.md``; the raw per-seed numbers are in ``<out>/paper/study.json``.

``smoke=True`` shrinks every run to 2 optimisation steps of a small version of its network: it checks that the
data are readable and every recipe runs end to end in a minute (the numbers mean nothing). CI runs it on a
synthetic data root written in the real on-disk formats (:func:`write_synthetic_data`).

Under ``torchrun`` every run is DDP (rank 0 writes); each run checks at its end that the ranks hold the same
trained weights (``ranks_in_sync`` in study.json). MAXL's second-order step is single-process only: under
torchrun its runs are skipped with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core import dist
from ..core.hooks import Hook
from ..core.stats import mean_std
from ..engine.experiment import load_config
from ..engine.run import run_training
from ..errors import ConfigError, DataError
from .common import configs_root, read_study, write_study

# ---- data: what each recipe reads, and where ---------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    folder: str  # under the data root
    files: Tuple[str, ...]  # required files in the folder; () means an ImageFolder tree
    what: str  # what it is and where to get it

    def missing(self, root: Path) -> List[str]:
        base = root / self.folder
        if self.files:
            return [f"{self.folder}/{f}" for f in self.files if not (base / f).is_file()]
        return [] if _has_image_tree(base) else [f"{self.folder}/<class>/<image>"]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _has_image_tree(base: Path) -> bool:
    """``base/<class>/<image>`` or ``base/train/<class>/<image>``."""
    if not base.is_dir():
        return False
    tops = [base / "train"] if (base / "train").is_dir() else [base]
    for top in tops:
        for d in top.iterdir():
            if d.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()):
                return True
    return False


CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
DATA: Dict[str, DataSpec] = {
    "cifar10": DataSpec("cifar-10-batches-py", CIFAR10_FILES,
                        "CIFAR-10, python version (cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"),
    "cifar100": DataSpec("cifar-100-python", ("train", "test"),
                         "CIFAR-100, python version (cifar-100-python.tar.gz from the same page, extracted; 'meta' gives class names)"),
    "source-imagenet": DataSpec("sskt-sources/imagenet", (),
                                "SSKT source I: an ImageFolder tree, <class>/<image> or train/<class>/ + val/<class>/ (e.g. an ImageNet subset)"),
    "source-places365": DataSpec("sskt-sources/places365", (),
                                 "SSKT source P: an ImageFolder tree of another label space (e.g. a Places365 subset)"),
}


def compact(paths: Sequence[str]) -> str:
    """``a/x, a/y, b/z`` -> ``a/{x,y}, b/z``."""
    groups: Dict[str, List[str]] = {}
    for p in paths:
        head, _, tail = p.partition("/") if p.count("/") == 1 else (p, "", "")
        groups.setdefault(head, []).append(tail)
    parts = []
    for head, tails in groups.items():
        tails = [t for t in tails if t]
        parts.append(head if not tails else f"{head}/{tails[0]}" if len(tails) == 1 else f"{head}/{{{','.join(tails)}}}")
    return ", ".join(parts)


def layout_text() -> str:
    """The expected layout under the data root, one line per dataset."""
    lines = []
    for spec in DATA.values():
        inside = "{" + ",".join(spec.files) + "}" if spec.files else "<class>/<image>"
        lines.append(f"  DATA_ROOT/{spec.folder}/{inside}  -- {spec.what}")
    return "\n".join(lines)


# ---- runs and recipes ----------------------------------------------------------------------------------------

WRN_SMALL = ("model.name=wrn", "model.kwargs={depth: 10, widen: 1}")
KF_SMALL = WRN_SMALL + ("method.tsn={name: mobilenetv2, kwargs: {width_mult: 0.25, last_channels: 64}}", "method.tsn_dim=64")
RESNET_SMALL = ("model.kwargs={width: 4}",)
GEM_SMALL = ("model.kwargs={nf: 4}",)
SMOKE = ("train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4", "train.eval_every=1", "train.eval_batch_size=256",
         "train.plots=false", "train.progress=off")


@dataclass(frozen=True)
class Run:
    config: str  # under the configs root
    data: str  # a key of DATA: data.root is set to DATA_ROOT/<its folder>
    links: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()  # (override key, run ids whose directories it gets)
    shared: bool = False  # trained once (seed 0) and reused by every seed: teachers and sources
    seeded_classes: bool = False  # continual: the class order follows the seed (SupSup's RandSplitCIFAR100)
    smoke: Tuple[str, ...] = ()  # smaller network for smoke runs


RUNS: Dict[str, Run] = {
    "teacher-cifar10": Run("paper/kf/teacher_cifar10_wrn28_2.yaml", "cifar10", shared=True, smoke=WRN_SMALL),
    "kf-cifar10-1task": Run("paper/kf/kf_cifar10_1task.yaml", "cifar10", (("method.teacher", ("teacher-cifar10",)),), smoke=KF_SMALL),
    "kd-cifar10-wrn40_2": Run("paper/kf/kd_cifar10_wrn40_2.yaml", "cifar10", (("method.teacher", ("teacher-cifar10",)),), smoke=WRN_SMALL),
    "kf-cifar10-2tasks": Run("paper/kf/kf_cifar10_2tasks.yaml", "cifar10", (("method.teacher", ("teacher-cifar10",)),), smoke=KF_SMALL),
    "kd-cifar10-wrn28_3": Run("paper/kf/kd_cifar10_wrn28_3.yaml", "cifar10", (("method.teacher", ("teacher-cifar10",)),), smoke=WRN_SMALL),
    "teacher-cifar100coarse": Run("paper/kf/teacher_cifar100coarse_wrn28_2.yaml", "cifar100", shared=True, smoke=WRN_SMALL),
    "kf-cifar100coarse-4tasks": Run("paper/kf/kf_cifar100coarse_4tasks.yaml", "cifar100", (("method.teacher", ("teacher-cifar100coarse",)),),
                                    smoke=KF_SMALL),
    "kd-cifar100coarse-wrn40_3": Run("paper/kf/kd_cifar100coarse_wrn40_3.yaml", "cifar100", (("method.teacher", ("teacher-cifar100coarse",)),),
                                     smoke=WRN_SMALL),
    "supsup-splitcifar100": Run("paper/cl/supsup_splitcifar100.yaml", "cifar100", seeded_classes=True, smoke=GEM_SMALL),
    "impresslearn-splitcifar100": Run("paper/cl/impresslearn_splitcifar100.yaml", "cifar100", seeded_classes=True,
                                      smoke=GEM_SMALL + ("method.alpha_epochs=1",)),
    "sskt-source-imagenet": Run("paper/sskt/source_imagenet_resnet18.yaml", "source-imagenet", shared=True, smoke=RESNET_SMALL),
    "sskt-source-places365": Run("paper/sskt/source_places365_resnet18.yaml", "source-places365", shared=True, smoke=RESNET_SMALL),
}
SOURCES = ("sskt-source-imagenet", "sskt-source-places365")
for _t in ("cifar10", "cifar100"):
    RUNS.update({
        f"sskt-{_t}-scratch": Run(f"paper/sskt/{_t}_scratch.yaml", _t, smoke=RESNET_SMALL),
        f"sskt-{_t}-teacher": Run(f"paper/sskt/{_t}_teacher_resnet56.yaml", _t, shared=True, smoke=RESNET_SMALL),
        f"sskt-{_t}-kd": Run(f"paper/sskt/{_t}_kd.yaml", _t, (("method.teacher", (f"sskt-{_t}-teacher",)),), smoke=RESNET_SMALL),
        f"sskt-{_t}-dml": Run(f"paper/sskt/{_t}_dml.yaml", _t, smoke=RESNET_SMALL),
        f"sskt-{_t}-maxl": Run(f"paper/sskt/{_t}_maxl.yaml", _t, smoke=RESNET_SMALL),
        f"sskt-{_t}-sskt": Run(f"paper/sskt/{_t}_sskt.yaml", _t, (("method.sources", SOURCES),), smoke=RESNET_SMALL),
    })


@dataclass(frozen=True)
class Row:
    label: str
    run: str
    metric: str  # a path into the run's results.json, e.g. "final/test/acc" or "avg_acc"
    paper: str  # the paper's number (or why there is none), with its source


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    rows: Tuple[Row, ...]
    runs: Tuple[str, ...] = field(default=())  # in training order; default: the rows' runs (+ their links)

    def run_order(self) -> List[str]:
        order: List[str] = []

        def add(rid: str) -> None:
            for _, deps in RUNS[rid].links:
                for d in deps:
                    add(d)
            if rid not in order:
                order.append(rid)

        for rid in self.runs or [r.run for r in self.rows]:
            add(rid)
        return order

    def data(self) -> List[str]:
        return sorted({RUNS[r].data for r in self.run_order()})


ACC = "final/test/acc"
KF_NOTE = "KF repo (Adamdad/KnowledgeFactor), header of the cifar10-kf WRN-28-2 config"
SSKT_TAB = "SSKT paper (WACV'22), Table 8 / README, ResNet-20, mean ± std of 3 runs"
RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    Recipe("kf-cifar10", "KF on CIFAR-10, 1 task (the official released configuration)", (
        Row("teacher WRN-28-2", "teacher-cifar10", ACC, "not in the repo (teacher checkpoint and log on Google Drive)"),
        Row("KF factor network: CKN WRN-28-2 + TSN MobileNetV2 x0.5", "kf-cifar10-1task", ACC, f"93.58 ({KF_NOTE})"),
        Row("KD student WRN-40-2 (same size)", "kd-cifar10-wrn40_2", ACC, "paper's KD rows not retrieved (kf.md §5.2)"),
    )),
    Recipe("kf-cifar10-2tasks", "KF on CIFAR-10, 2 tasks (vehicles / animals), assembled over the 10 classes", (
        Row("KF assembled (both factor networks)", "kf-cifar10-2tasks", ACC, "none: the official multi-task code was deleted before release"),
        Row("KF factor network, vehicles", "kf-cifar10-2tasks", "final/test/acc_classes_0-1-8-9", "none"),
        Row("KF factor network, animals", "kf-cifar10-2tasks", "final/test/acc_classes_2-3-4-5-6-7", "none"),
        Row("KD student WRN-28-3 (same size)", "kd-cifar10-wrn28_3", ACC, "none"),
    )),
    Recipe("kf-cifar100coarse-4tasks", "KF on CIFAR-100, 20 coarse labels in 4 tasks of 5, assembled over the 20", (
        Row("teacher WRN-28-2 (coarse labels)", "teacher-cifar100coarse", ACC, "none"),
        Row("KF assembled (4 factor networks)", "kf-cifar100coarse-4tasks", ACC, "none (not a setting of the paper)"),
        Row("KD student WRN-40-3 (same size)", "kd-cifar100coarse-wrn40_3", ACC, "none"),
    )),
    Recipe("supsup-splitcifar100", "SupSup (GG) on SplitCIFAR100, 20 x 5 classes, GEMResNet18", (
        Row("SupSup average accuracy after 20 tasks", "supsup-splitcifar100", "avg_acc",
            "≈ 89 (per-task 83-95 in supsup issue #11; the ImpressLearn authors' re-runs average ≈ 89); the paper gives a plot (Fig. 3)"),
    )),
    Recipe("impresslearn-splitcifar100", "ImpressLearn on SplitCIFAR100, 5 heterogeneous impressions, GEMResNet18", (
        Row("ImpressLearn average accuracy after 20 tasks", "impresslearn-splitcifar100", "avg_acc",
            "paper's table not retrieved; authors' 2021 notebook with 3 impressions: new tasks 56-84"),
    )),
    Recipe("sskt-cifar10", "SSKT on CIFAR-10 (ResNet-20) with two ImageFolder sources, vs scratch / KD / DML / MAXL", (
        Row("scratch", "sskt-cifar10-scratch", ACC, f"92.19 ± 0.09 ({SSKT_TAB})"),
        Row("KD (ResNet-56 teacher trained on CIFAR-10)", "sskt-cifar10-kd", ACC, "91.75 ± 0.24"),
        Row("DML (2 peers)", "sskt-cifar10-dml", ACC, "92.37 ± 0.15"),
        Row("MAXL (psi 10)", "sskt-cifar10-maxl", ACC, "91.56 ± 0.16 (README; psi 10)"),
        Row("SSKT (P+I)", "sskt-cifar10-sskt", ACC, "92.46 ± 0.15 (ImageNet + Places365 ResNet-50 sources)"),
    )),
    Recipe("sskt-cifar100", "SSKT on CIFAR-100 (ResNet-20) with two ImageFolder sources, vs scratch / KD / DML / MAXL", (
        Row("scratch", "sskt-cifar100-scratch", ACC, f"68.26 ± 0.36 ({SSKT_TAB})"),
        Row("KD (ResNet-56 teacher trained on CIFAR-100)", "sskt-cifar100-kd", ACC, "68.66 ± 0.24"),
        Row("DML (2 peers)", "sskt-cifar100-dml", ACC, "69.48 ± 0.05"),
        Row("MAXL (psi 5)", "sskt-cifar100-maxl", ACC, "not reported"),
        Row("SSKT (P+I)", "sskt-cifar100-sskt", ACC, "68.63 ± 0.12 (best R20 cell: source I only)"),
    )),
)}


# ---- planning --------------------------------------------------------------------------------------------------


def select(only: Optional[Sequence[str]]) -> List[Recipe]:
    if not only:
        return list(RECIPES.values())
    unknown = [n for n in only if n not in RECIPES]
    if unknown:
        raise ConfigError(f"unknown paper recipe {unknown[0]!r}; valid: {', '.join(RECIPES)}")
    return [RECIPES[n] for n in only]


def plan(data_root: Path, only: Optional[Sequence[str]] = None) -> Tuple[List[Recipe], Dict[str, List[str]]]:
    """(recipes whose data are all present, {skipped recipe: its missing files}). Raises a one-line
    :class:`DataError` naming the missing files when the data root is absent or no chosen recipe can run."""
    recipes = select(only)
    root = Path(data_root).expanduser()
    needed = sorted({k for r in recipes for k in r.data()})
    if not root.is_dir():
        wanted = [f"{DATA[k].folder}/{'{' + ','.join(DATA[k].files) + '}' if DATA[k].files else '<class>/<image>'}" for k in needed]
        raise DataError(f"data root {str(root)!r} does not exist; the paper-scale recipes read {', '.join(wanted)} under it "
                        "(layout: docs/paper-scale.md)")
    missing = {k: DATA[k].missing(root) for k in needed}
    runnable, skipped = [], {}
    for r in recipes:
        gone = [f for k in r.data() for f in missing[k]]
        if gone:
            skipped[r.name] = gone
        else:
            runnable.append(r)
    if not runnable:
        every = [f for k in needed for f in missing[k]]
        raise DataError(f"no paper-scale recipe can run from {str(root)!r}: missing {compact(every)} (layout: docs/paper-scale.md)")
    return runnable, skipped


def plan_text(data_root: Path, only: Optional[Sequence[str]] = None) -> str:
    runnable, skipped = plan(data_root, only)
    lines = [f"paper-scale recipes with data under {data_root}:"]
    lines += [f"  run   {r.name:<28s} {r.title}" for r in runnable]
    for name, gone in skipped.items():
        lines.append(f"  skip  {name:<28s} missing {compact(gone)}")
    if skipped:
        lines += ["expected layout:", layout_text()]
    return "\n".join(lines)


# ---- running ---------------------------------------------------------------------------------------------------


class RanksInSync(Hook):
    """Under DDP, at the end of a run: do all ranks hold the same trained state? (BatchNorm running statistics are
    left out: without SyncBatchNorm each rank keeps its own.) Recorded as ``ranks_in_sync`` in the summary."""

    def on_fit_end(self, trainer, summary) -> None:
        if dist.world_size() > 1:
            summary["ranks_in_sync"] = len(set(dist.all_gather_object(state_digest(trainer.exp.method)))) == 1


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (extra states such as packed masks included), BatchNorm running statistics left out."""
    h = hashlib.sha256()
    for key, value in sorted(_flat_tensors(module.state_dict()).items()):
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            h.update(key.encode())
            h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flat_tensors(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat_tensors(v).items()})
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out


def run_dir_of(out: Path, rid: str, seed: int) -> Path:
    return out / "runs" / rid if RUNS[rid].shared else out / "runs" / rid / f"seed{seed}"


LIST_KEYS = {"method.sources"}  # options that take a list of run directories


def run_overrides(rid: str, seed: int, data_root: Path, out: Path, smoke: bool, extra: Sequence[str]) -> List[str]:
    run = RUNS[rid]
    seed = 0 if run.shared else seed
    over = [f"seed={seed}", f"data.root={json.dumps(str(Path(data_root) / DATA[run.data].folder))}"]
    for key, deps in run.links:  # paths as JSON strings: valid YAML whatever characters they hold
        dirs = [json.dumps(str(run_dir_of(out, d, seed))) for d in deps]
        over.append(f"{key}=[{', '.join(dirs)}]" if key in LIST_KEYS else f"{key}={dirs[0]}")
    if run.seeded_classes:
        over.append(f"data.scenario.class_order_seed={seed}")
    if smoke:
        over += [*SMOKE, *run.smoke]
    return over + list(extra)


def train_run(rid: str, seed: int, data_root: Path, out: Path, smoke: bool, extra: Sequence[str], configs: Path) -> Dict[str, Any]:
    """Train one run (or reuse it when finished; resume it when interrupted); returns its results."""
    run_dir = run_dir_of(out, rid, seed)
    done = run_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = load_config(configs / RUNS[rid].config, run_overrides(rid, seed, data_root, out, smoke, extra))
    if cfg.method.name == "maxl" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return {"skipped": "MAXL's second-order step runs in one process: run this recipe without torchrun"}
    # resume whatever is there: a checkpoint continues, a run killed before its first checkpoint starts again
    return run_training(cfg, run_dir, resume=run_dir.exists(), hooks=[RanksInSync()])


def metric(summary: Dict[str, Any], path: str) -> Optional[float]:
    """``final/test/acc`` -> summary["final"]["test/acc"]; ``avg_acc`` -> summary["avg_acc"]."""
    if path in summary:
        return summary[path]
    head, _, rest = path.partition("/")
    inner = summary.get(head)
    return inner.get(rest) if isinstance(inner, dict) else None


def run_paper_study(data_root: Path, out: Path = Path("results"), seeds: Sequence[int] = (0, 1, 2), only: Optional[Sequence[str]] = None,
                    smoke: bool = False, overrides: Sequence[str] = (), log: Callable[[str], None] = print,
                    configs: Optional[Path] = None) -> Path:
    """Every chosen recipe whose data are present, over ``seeds``; returns ``<out>/PAPER-SCALE[-smoke].md``."""
    runnable, skipped = plan(data_root, only)
    root = configs_root(configs)
    data_root, out = Path(data_root).expanduser(), Path(out)
    study_dir = out / ("paper-smoke" if smoke else "paper")
    main = dist.is_main_process() if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0
    for name, gone in skipped.items():
        if main:
            log(f"[paper] skip {name}: missing {compact(gone)} under {data_root}")
    study = read_study(study_dir / "study.json") or {}
    recipes: Dict[str, Any] = dict(study.get("recipes", {}))
    for recipe in runnable:
        t0 = time.time()
        results: Dict[str, List[Dict[str, Any]]] = {}
        for rid in recipe.run_order():
            run_seeds = [0] if RUNS[rid].shared else list(seeds)
            results[rid] = [train_run(rid, s, data_root, study_dir, smoke, overrides, root) for s in run_seeds]
            if main:
                log(f"[paper:{recipe.name}] {rid}: " + ", ".join(_brief(r) for r in results[rid]))
        rows = []
        for row in recipe.rows:
            values = [metric(r, row.metric) for r in results[row.run]]
            values = [v for v in values if v is not None]
            rows.append({"label": row.label, "run": row.run, "metric": row.metric, "paper": row.paper, "values": values,
                         "ours": mean_std(values) if values else None,
                         "note": next((r["skipped"] for r in results[row.run] if "skipped" in r), None)})
        sync = [r["ranks_in_sync"] for rs in results.values() for r in rs if "ranks_in_sync" in r]
        recipes[recipe.name] = {"title": recipe.title, "status": "ran", "seeds": list(seeds), "smoke": smoke, "rows": rows,
                                "minutes": round((time.time() - t0) / 60, 2),
                                "world_size": int(os.environ.get("WORLD_SIZE", "1")), "ranks_in_sync": all(sync) if sync else None,
                                "runs": {rid: [_keep(r) for r in rs] for rid, rs in results.items()}}
    for name, gone in skipped.items():
        recipes.setdefault(name, {"title": RECIPES[name].title, "status": "skipped", "missing": gone})
    summary = {"data_root": str(data_root), "seeds": list(seeds), "smoke": smoke, "overrides": list(overrides), "recipes": recipes}
    path = out / ("PAPER-SCALE-smoke.md" if smoke else "PAPER-SCALE.md")
    if main:
        write_study(study_dir / "study.json", summary)
        path.write_text(paper_table(summary))
    dist.barrier()
    return path


def write_paper_table(out: Path, smoke: bool = False) -> Path:
    """PAPER-SCALE.md again from ``<out>/paper/study.json`` (no training)."""
    study = read_study(Path(out) / ("paper-smoke" if smoke else "paper") / "study.json")
    if study is None:
        raise DataError(f"no paper-scale study under {str(out)!r} (run kbricks reproduce --scale paper first)")
    path = Path(out) / ("PAPER-SCALE-smoke.md" if smoke else "PAPER-SCALE.md")
    path.write_text(paper_table(study))
    return path


def _brief(summary: Dict[str, Any]) -> str:
    if "skipped" in summary:
        return "skipped (MAXL under torchrun)"
    acc = metric(summary, ACC) if "final" in summary else summary.get("avg_acc")
    return f"{100 * acc:.2f}%" if isinstance(acc, float) else "done"


def _keep(summary: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("seed", "final", "best", "params", "avg_acc", "final_accs", "bwt", "forgetting", "params_per_task", "bytes_per_task",
            "train_seconds", "train_seconds_this_session", "world_size", "ranks_in_sync", "run_dir", "skipped")
    return {k: summary[k] for k in keys if k in summary}


def paper_table(study: Dict[str, Any]) -> str:
    """PAPER-SCALE.md from study.json alone."""
    lines = ["# Paper-scale recipes: the papers' numbers and ours", "",
             f"Generated by `kbricks reproduce --scale paper` from `{study['data_root']}` "
             f"({'SMOKE budgets: 2 steps per run on small networks, the numbers mean nothing' if study['smoke'] else 'full budgets'}). "
             "Top-1 test accuracy % at the last epoch (continual: average over tasks after the last task), "
             "mean ± std over seeds. Teachers and sources are trained once (seed 0). Recipes, their differences from the "
             "official code and their cost: docs/paper-scale.md.", "",
             "| recipe | run | paper | ours |", "|---|---|---|---|"]
    for name, rec in study["recipes"].items():
        if rec["status"] == "skipped":
            lines.append(f"| {name} | not run: missing {compact(rec['missing'])} | | |")
            continue
        for row in rec["rows"]:
            o = row["ours"]
            ours = (f"{100 * o['mean']:.2f} ± {100 * o['std']:.2f} (n={o['n']})" if o else (row.get("note") or "n/a"))
            lines.append(f"| {name} | {row['label']} | {row['paper']} | {ours} |")
    lines.append("")
    for name, rec in study["recipes"].items():
        if rec["status"] == "ran":
            sync = rec.get("ranks_in_sync")
            extra = f"; {rec['world_size']} processes, ranks in sync: {sync}" if rec.get("world_size", 1) > 1 else ""
            lines.append(f"- {name}: seeds {rec['seeds']}, {rec['minutes']:.1f} min{extra}")
    return "\n".join(lines) + "\n"


# ---- a synthetic data root in the real formats (smoke tests, trying a set-up) -------------------------------


def write_synthetic_data(root: Path, train_per_class: int = 3, test_per_class: int = 2, seed: int = 0,
                         sources: Tuple[Tuple[str, int, int], ...] = (("imagenet", 4, 40), ("places365", 3, 48))) -> Path:
    """A tiny random data root in the layout of :data:`DATA`: CIFAR-10 / CIFAR-100 python pickle batches (uint8
    N x 3072, labels; CIFAR-100 coarse label = fine // 5) and ImageFolder trees of PNGs (``(name, classes, size)``;
    sizes other than 32 exercise the loader's resize). Each class has its own mean colour, so it is learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)

    def images(labels: np.ndarray, size: int = 32) -> np.ndarray:
        base = rng.integers(30, 225, size=(int(labels.max()) + 1, 3, 1, 1))
        noise = rng.normal(0, 25, size=(len(labels), 3, size, size))
        return np.clip(base[labels] + noise, 0, 255).astype(np.uint8)

    def dump(path: Path, obj: Dict[bytes, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def split(n_classes: int, per: int) -> np.ndarray:
        return rng.permutation(np.repeat(np.arange(n_classes), per))

    c10 = root / DATA["cifar10"].folder
    y = split(10, train_per_class * 5)
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        dump(c10 / f"data_batch_{i}", {b"data": images(y[part]).reshape(len(part), -1), b"labels": y[part].tolist()})
    y = split(10, test_per_class)
    dump(c10 / "test_batch", {b"data": images(y).reshape(len(y), -1), b"labels": y.tolist()})
    dump(c10 / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})

    c100 = root / DATA["cifar100"].folder
    for name, per in (("train", train_per_class), ("test", test_per_class)):
        y = split(100, per)
        dump(c100 / name, {b"data": images(y).reshape(len(y), -1), b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist()})
    dump(c100 / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})

    for name, classes, size in sources:
        y = split(classes, train_per_class + test_per_class)
        for i, (img, c) in enumerate(zip(images(y, size), y)):
            d = root / "sskt-sources" / name / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i}.png")
    return root

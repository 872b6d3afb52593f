"""The continual-learning baselines study (issue 26): SupSup and ImpressLearn beside the field's baselines on the
same scenarios, backbones and budgets, ``kbricks study cl --baselines --scenario {permuted,rotated,split}``.

Per scenario and seed, with the backbone of the scenario's configs (``studies.cl.CL_SCENARIOS``):

* **SupSup** (its config: a mask per task), task inference without the id by the one-shot rule;
* **ImpressLearn** with the scenario's heterogeneous impressions (k SupSup masks spread over the sequence, the cl
  study's ``compare`` k but at most half of the tasks, so that at least half are learned by combination; their
  accuracy is also reported alone, since a donor task finds its own mask among the impressions), coefficients fit
  per task;
* the dense baselines from the scenario's fine-tuning config (Adam), trained for as many epochs per task as SupSup's
  masks (the same steps per task), each in two settings: **task-incremental** (``head: per_task``, the task id picks
  the head) and **without the task id** (``head: shared`` on Permuted/Rotated, where every task has the same labels:
  domain-incremental; ``head: union`` on Split digits, one head over all classes: class-incremental):
  fine-tuning; EWC (online, empirical Fisher on 1000 images per task, lambda 100); LwF (T 2, weight 1); ER (200
  samples per task, class-balanced, replayed batch = the batch size).

Recorded per run: average accuracy, forgetting, BWT, bytes stored per task (masks / coefficients / heads / buffer,
BatchNorm statistics counted) and fixed extra bytes (Fisher + anchor, teacher, a fixed buffer), training seconds,
and the task-free accuracy where it is defined (a shared or union head: its accuracy; SupSup/ImpressLearn: GNu, the
label accuracy with the task inferred from 1 / 16 test images, a wrong task counting as wrong). Writes
``out/cl-baselines/<scenario>/study.json``; ``section()`` renders it (no verdicts).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from ..core.stats import mean_std
from ..engine.sweep import train_or_reuse
from ..errors import ConfigError
from .cl import CL_SCENARIOS, spread
from .common import configs_root, read_study, write_study

# the baselines' stated settings
EWC = ["method.name=ewc", "method.ewc_lambda=100", "method.fisher_samples=1000"]
LWF = ["method.name=lwf", "method.temperature=2", "method.distill_weight=1"]
ER = ["method.name=er", "method.buffer_per_task=200"]
DENSE = {"finetune": ["method.name=finetune"], "ewc": EWC, "lwf": LWF, "er": ER}
NAMES = {"finetune": "fine-tuning", "ewc": "EWC (λ 100)", "lwf": "LwF (T 2, weight 1)", "er": "ER (200 samples per task)"}
TASK_FREE_HEAD = {"permuted": "shared", "rotated": "shared", "split": "union"}
SETTING = {"per_task": "task-IL", "shared": "domain-IL", "union": "class-IL"}

# --quick: small enough that 3 scenarios x 3 seeds take about 25 minutes on a 2-core CPU (measured: see docs/methods.md)
QUICK = {
    "permuted": ["data.scenario.num_tasks=5", "train.epochs=3"],
    "rotated": ["data.scenario.num_tasks=6", "train.epochs=3"],
    "split": ["train.epochs=10"],
}
KEPT = ("avg_acc", "forgetting", "bwt", "final_accs", "bytes_per_task", "fixed_bytes", "bn_bytes_per_task", "per_task_state",
        "train_seconds", "inference_seconds", "head", "uses_task_id", "shared_params", "impression_bytes")


def compact(result: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: result[k] for k in KEPT if k in result}
    for n in ("1img", "16img"):
        if f"gnu_acc/one_shot/{n}" in result:
            out[f"task_free_acc/{n}"] = result[f"gnu_acc/one_shot/{n}"]
    if result.get("uses_task_id") is False:  # a shared or union head never reads the task id
        out["task_free_acc/1img"] = result["avg_acc"]
    return out


def epochs_of(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["train"]["epochs"])


def run_cl_baselines_study(seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                           scenario: str = "permuted", configs: Optional[Path] = None) -> Dict[str, Any]:
    if scenario not in CL_SCENARIOS:
        raise ConfigError(f"unknown CL baselines scenario {scenario!r}; valid: {', '.join(CL_SCENARIOS)}")
    spec, root = CL_SCENARIOS[scenario], configs_root(configs)
    out = Path(out) / "cl-baselines" / scenario
    quick_over = [*QUICK[scenario]] if quick else []
    epochs = epochs_of(root / spec.supsup)
    t_start = time.time()
    runs: List[Dict[str, Any]] = []
    for seed in seeds:
        base = [f"seed={seed}", *quick_over]
        rec: Dict[str, Any] = {"seed": seed}
        inference = ["inference.images=[1, 16]", "inference.methods=[one_shot]"] + (["inference.trials_per_task=20"] if quick else [])
        sup = train_or_reuse(root / spec.supsup, out / f"supsup-seed{seed}", base + [f"name=supsup-{scenario}", *inference])
        rec["supsup"] = compact(sup)
        T = len(sup["final_accs"])
        # at most half the sequence donates impressions, so at least half of the tasks are learned by combination
        k = max(1, min(spec.compare[1], T // 2))
        donors = spread(T, k)
        il_over = base + [f"name=impresslearn-{scenario}", f"method.impressions={k}", "method.source=stored",
                          f"method.from_run={(out / f'supsup-seed{seed}').resolve()}", f"method.slots={donors}", *inference]
        il_over += ["method.alpha_epochs=1"] if quick else []
        il = compact(train_or_reuse(root / spec.impresslearn, out / f"impresslearn-k{k}-seed{seed}", il_over))
        new_accs = [a for t, a in enumerate(il["final_accs"]) if t not in donors]
        rec["impresslearn"] = {"k": k, "donors": donors, "new_task_acc": sum(new_accs) / len(new_accs), **il}
        log(f"[cl-baselines:{scenario}] seed {seed}: SupSup {sup['avg_acc']:.4f}, ImpressLearn k={k} {rec['impresslearn']['avg_acc']:.4f}")
        for method, over in DENSE.items():
            for head in ("per_task", TASK_FREE_HEAD[scenario]):
                dense = [f"seed={seed}", f"name={method}-{head}-{scenario}", f"train.epochs={epochs}", *quick_over, *over,
                         f"method.head={head}", "inference=null"]  # quick budgets after SupSup's epochs
                dense += ["method.fisher_samples=300"] if quick and method == "ewc" else []
                r = compact(train_or_reuse(root / spec.finetune, out / f"{method}-{head}-seed{seed}", dense))
                rec[f"{method}/{head}"] = r
                log(f"[cl-baselines:{scenario}] seed {seed}: {method} {SETTING[head]} {r['avg_acc']:.4f} (forgetting {r['forgetting']:.4f})")
        runs.append(rec)
    quick_epochs = [int(o.split("=")[1]) for o in quick_over if o.startswith("train.epochs=")]
    summary = {"study": f"cl-baselines-{scenario}", "title": spec.title, "seeds": list(seeds), "quick": quick,
               "epochs_per_task": quick_epochs[-1] if quick_epochs else epochs,
               "task_free_head": TASK_FREE_HEAD[scenario], "minutes": round((time.time() - t_start) / 60, 2), "runs": runs}
    write_study(out / "study.json", summary)
    return summary


# ---- the table ---------------------------------------------------------------------------------------------------


def _values(study: Dict[str, Any], key: str, metric: str) -> List[float]:
    out = []
    for rec in study["runs"]:
        v = rec.get(key, {}).get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
    return out


def _cell(study, key, metric, scale=1.0, digits=0) -> str:
    v = _values(study, key, metric)
    if not v:
        return "—"
    if scale == 1.0 and digits == 0:
        return f"{mean_std(v)['mean']:,.0f}"
    m = mean_std([x * scale for x in v])
    return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}"


def _training_minutes(study: Dict[str, Any]) -> float:
    """Summed over every run (the study's own wall time counts only the runs it did not reuse)."""
    return sum(r.get("train_seconds", 0.0) for rec in study["runs"] for r in rec.values() if isinstance(r, dict)) / 60


def section(runs: Path) -> List[str]:
    lines: List[str] = []
    for scenario in CL_SCENARIOS:
        st = read_study(Path(runs) / "cl-baselines" / scenario / "study.json")
        if st:
            lines += scenario_table(st, scenario)
    return lines


def scenario_table(st: Dict[str, Any], scenario: str) -> List[str]:
    n, rec0 = len(st["seeds"]), st["runs"][0]
    T = len(rec0["supsup"]["final_accs"])
    free = SETTING[st["task_free_head"]]
    k = rec0["impresslearn"]["k"]
    lines = [f"## Continual learning baselines on {st['title']}", "",
             f"`kbricks study cl --baselines --scenario {scenario}`{' --quick' if st.get('quick') else ''}: {n} seed{'s' if n > 1 else ''} "
             f"(mean ± std), {T} tasks, {_training_minutes(st):.1f} minutes of training summed over its runs. Dense baselines: the fine-tuning config's network and Adam, "
             f"{st['epochs_per_task']} epochs per task (SupSup's budget); task-IL = one head per task chosen by the task id; {free} = "
             "no task id. Bytes per task: what every new task adds (masks, coefficients, head rows, replayed samples; BatchNorm "
             "statistics counted); fixed bytes: extra state of constant size (EWC's Fisher + anchor, LwF's previous network). "
             "Task-free accuracy: the accuracy without the task id (SupSup/ImpressLearn: the task inferred by the one-shot rule "
             "from 1 / 16 test images of one task, a wrong task counting as wrong; a dense head without the task id: its "
             "accuracy; — where the method needs the id).", "",
             "| method | setting | avg accuracy % | forgetting (points) | bytes per task | fixed bytes | training s | task-free acc % (1 / 16 img) |",
             "|---|---|---|---|---|---|---|---|"]

    def row(name, key, setting):
        tf1, tf16 = _cell(st, key, "task_free_acc/1img", 100, 2), _cell(st, key, "task_free_acc/16img", 100, 2)
        tf = "—" if tf1 == "—" and tf16 == "—" else (tf1 if tf16 == "—" else f"{tf1} / {tf16}")
        lines.append(f"| {name} | {setting} | {_cell(st, key, 'avg_acc', 100, 2)} | {_cell(st, key, 'forgetting', 100, 2)} | "
                     f"{_cell(st, key, 'bytes_per_task')} | {_cell(st, key, 'fixed_bytes') if _values(st, key, 'fixed_bytes') else '0'} | "
                     f"{_cell(st, key, 'train_seconds', 1, 1)} | {tf} |")

    row("SupSup (a mask per task)", "supsup", "task-IL")
    row(f"ImpressLearn, k={k} heterogeneous impressions (all {T} tasks)", "impresslearn", "task-IL")
    lines.append(f"| ImpressLearn, the {T - k} new tasks (not donors of an impression) | task-IL | "
                 f"{_cell(st, 'impresslearn', 'new_task_acc', 100, 2)} | | | | | |")
    for head in ("per_task", st["task_free_head"]):
        for method in DENSE:
            row(NAMES[method], f"{method}/{head}", SETTING[head])
    il = rec0["impresslearn"]
    lines += ["", f"ImpressLearn's k impression masks ({il.get('impression_bytes', 0):,.0f} B) are shared by every task and paid once "
              "(not in the fixed-bytes column); the dense networks have "
              f"{rec0['finetune/per_task'].get('shared_params', 0):,} trained weights.", ""]
    return lines


__all__ = ["run_cl_baselines_study", "section"]

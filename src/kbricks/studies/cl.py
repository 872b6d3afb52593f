"""The continual-learning study (issue 12): SupSup, ImpressLearn and a dense fine-tuning baseline on PermutedMNIST-5k
(13 tasks, so that 3 impressions leave 10 new tasks per seed), RotatedMNIST-5k (36 tasks, 10-degree steps) and Split
digits (conv net with per-task BatchNorm), over seeds.

Per scenario and seed:

1. **SupSup** learns a mask for every task (the reference: dedicated masks; task inference without the id).
2. **Dense fine-tuning** of the same network, task after task (the forgetting the supermask methods avoid).
3. **ImpressLearn accuracy vs k** for four kinds of impressions, k in (1, 2, 3, 5, 10, 20). Masks are learned once
   per seed and reused across k: *heterogeneous* impressions are SupSup masks of k tasks (``source: stored``), with
   two choices of tasks (``impression_tasks``): *spread* evenly over the sequence, or the *first k* tasks (the
   authors' choice); *homogeneous* ones come from one ImpressLearn run with 20 impressions of task 0 (each with its
   own score initialisation and data order), whose first k masks serve every smaller k; *random* ones are Bernoulli
   masks. Every run then fits an alpha over all k impressions for every task (kbricks' coefficient settings).
   At one k per scenario the authors' two recipes run as well (``recipe: authors_cifar`` on the spread impressions,
   ``recipe: authors_mnist`` with its own first-k impressions, see :mod:`kbricks.continual.impresslearn`).
4. **Impression alone**: every SupSup mask on every task's test set (a mask on a task it was not trained for).
5. **Missing task id**: SupSup's one-shot rule on SupSup's masks, and ImpressLearn's one-shot rule over combined
   masks and its re-fit of the coefficients (entropy minimisation from 1/k or from the nearest stored alpha), on the
   same random test batches.

The ``scale`` study is SupSup alone on 250 PermutedMNIST-5k tasks (one seed). Each study writes one ``study.json``
with the raw per-seed numbers; ``section()`` and the claims read only that file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..continual.impresslearn import recipe_overrides, spread
from ..core.plots import figure_api, save_figure
from ..core.stats import fmt, mean_std
from ..engine.sweep import train_or_reuse
from ..errors import ConfigError
from .common import configs_root, read_study, write_study
from .verdicts import Claim, Verdict, grade

KINDS = ("heterogeneous", "heterogeneous_first_k", "homogeneous", "random")
# "heterogeneous" is the spread choice (its key predates the first-k runs, so that committed studies still read)
KIND_LABELS = {"heterogeneous": "heterogeneous, spread", "heterogeneous_first_k": "heterogeneous, first k",
               "homogeneous": "homogeneous", "random": "random"}
RECIPE_NAMES = ("authors_cifar", "authors_mnist")
KS = (1, 2, 3, 5, 10, 20)


@dataclass
class Scenario:
    title: str
    supsup: str
    impresslearn: str
    finetune: str
    ks: Sequence[int] = KS
    compare: Tuple[str, int] = ("heterogeneous", 3)  # the ImpressLearn run whose missing-id inference is measured
    authors_k: int = 5  # the k at which the authors' two recipes are run too
    num_tasks: Optional[int] = None  # the study's task count (every run, quick too), when not the configs' own
    quick: List[str] = field(default_factory=list)  # overrides of every run in --quick
    quick_il: List[str] = field(default_factory=lambda: ["method.alpha_epochs=1", "inference.refit_trials_per_task=2"])  # ImpressLearn runs
    quick_ks: Sequence[int] = (1, 2)
    g_objective: bool = False  # also SupSup's GNu setting: a 100-output superfluous-neuron head, inference by G


CL_SCENARIOS: Dict[str, Scenario] = {
    "permuted": Scenario("PermutedMNIST-5k", "continual/supsup_permuted.yaml", "continual/impresslearn_permuted.yaml",
                         "continual/finetune_permuted.yaml", compare=("heterogeneous", 3), authors_k=3, g_objective=True, num_tasks=13,
                         quick=["train.epochs=2", "inference.trials_per_task=3"], quick_ks=(1, 3)),
    "rotated": Scenario("RotatedMNIST-5k in 10° steps", "continual/supsup_rotated.yaml", "continual/impresslearn_rotated.yaml",
                        "continual/finetune_rotated.yaml", compare=("heterogeneous", 10), authors_k=5,
                        quick=["data.scenario.num_tasks=4", "train.epochs=2", "inference.trials_per_task=2"]),
    "split": Scenario("Split digits (2 classes per task), conv net with per-task BatchNorm", "continual/supsup_splitdigits_conv.yaml",
                      "continual/impresslearn_splitdigits_conv.yaml", "continual/finetune_splitdigits_conv.yaml",
                      compare=("heterogeneous", 2), authors_k=2,
                      quick=["train.epochs=3", "inference.trials_per_task=3"]),
}
SCALE_CONFIG = "continual/supsup_permuted250.yaml"
SCALE_QUICK = ["data.scenario.num_tasks=12", "inference.trials_per_task=2"]
CL_STUDIES = [*CL_SCENARIOS, "scale"]

KEPT = ("avg_acc", "forgetting", "bwt", "final_accs", "params_per_task", "bytes_per_task", "bn_bytes_per_task", "weights_per_mask",
        "bytes_per_mask", "stored_masks", "impression_bytes", "shared_params", "train_seconds", "inference_seconds", "per_task_state", "inference_trials_per_task",
        "inference_refit_trials_per_task")


def compact(result: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of a run that the tables and claims use (the full results stay in the run directory)."""
    out = {k: result[k] for k in KEPT if k in result}
    out.update({k: v for k, v in result.items() if k.split("/")[0] in ("task_inference", "gnu_acc", "gns_acc", "seconds_per_inference")})
    if "alpha_fit" in result:
        fit = result["alpha_fit"]
        out["alpha_kept_learned"] = sum(fit["kept_learned"]) / len(fit["kept_learned"])
        out["alpha_train_gain"] = sum(a - b for a, b in zip(fit["learned_train_acc"], fit["best_candidate_train_acc"])) / len(fit["task"])
        out["alpha_start_single"] = sum(s >= 0 for s in fit["start"]) / len(fit["start"])
    return out


def run_cl_study(seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                 scenario: str = "permuted", configs: Optional[Path] = None) -> Dict[str, Any]:
    """The study of one scenario (see the module doc) over ``seeds``; finished runs are reused, interrupted ones
    resumed. Writes ``out/cl/<scenario>/study.json``."""
    if scenario == "scale":
        return run_cl_scale_study(seeds[:1], out, quick=quick, log=log, configs=configs)
    if scenario not in CL_SCENARIOS:
        raise ConfigError(f"unknown CL study scenario {scenario!r}; valid: {', '.join(CL_STUDIES)}")
    spec, root = CL_SCENARIOS[scenario], configs_root(configs)
    out = Path(out) / "cl" / scenario
    quick_over = spec.quick if quick else []
    tasks_over = [f"data.scenario.num_tasks={spec.num_tasks}"] if spec.num_tasks else []
    ks = tuple(spec.quick_ks if quick else spec.ks)
    compare = ("heterogeneous", max(ks)) if quick else tuple(spec.compare)
    t_start = time.time()
    minutes: Dict[str, float] = {}
    wall: Dict[str, float] = {}
    seeds_out: List[Dict[str, Any]] = []

    def train(part: str, config: str, name: str, over: Sequence[str], quick_extra: Sequence[str] = ()) -> Dict[str, Any]:
        t0 = time.time()
        # the study's task count, then budgets (a quick budget may shrink the scenario further), then the run's own
        r = train_or_reuse(root / config, out / name, [*tasks_over, *quick_over, *(quick_extra if quick else []), *over])
        wall[part] = wall.get(part, 0.0) + (time.time() - t0) / 60
        # the run's own record of its training and inference time (the same when a finished run is reused)
        minutes[part] = minutes.get(part, 0.0) + (r.get("train_seconds", 0.0) + r.get("inference_seconds", 0.0)) / 60
        return r

    for seed in seeds:
        base = [f"seed={seed}"]
        rec: Dict[str, Any] = {"seed": seed}
        sup = train("supsup", spec.supsup, f"supsup-seed{seed}", base + [f"name=supsup-{scenario}"])
        rec["supsup"] = compact(sup)
        T = len(sup["final_accs"])
        log(f"[cl:{scenario}] seed {seed}: SupSup avg acc {sup['avg_acc']:.4f}")
        rec["finetune"] = compact(train("finetune", spec.finetune, f"finetune-seed{seed}", base + [f"name=finetune-{scenario}", "inference=null"]))
        log(f"[cl:{scenario}] seed {seed}: dense fine-tuning avg acc {rec['finetune']['avg_acc']:.4f}, forgetting {rec['finetune']['forgetting']:.4f}")
        rec["impression_alone"] = impression_alone(out / f"supsup-seed{seed}")
        if spec.g_objective and not quick:
            rec["supsup_g"] = compact(train("supsup/G objective", spec.supsup, f"supsup-g-seed{seed}", base + [
                f"name=supsup-g-{scenario}", "method.outputs=100", "inference.objective=g"]))

        kmax = max(ks)
        donor = f"il-homogeneous-k{kmax}-seed{seed}"
        il: Dict[str, Dict[str, Any]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            for k in sorted(ks, reverse=kind == "homogeneous"):  # the homogeneous donor (largest k) first
                if kind.startswith("heterogeneous") and k > T:
                    continue  # k impressions from k different tasks
                if kind == "heterogeneous_first_k" and spread(T, k) == list(range(k)):
                    il[kind][str(k)] = {**il["heterogeneous"][str(k)], "same_run_as": "heterogeneous"}  # the same impressions
                    continue
                infer = (kind, k) == compare
                over = base + [f"name=impresslearn-{scenario}", f"method.impressions={k}"] + ([] if infer else ["inference=null"])
                if kind == "heterogeneous":
                    over += ["method.source=stored", f"method.from_run={(out / f'supsup-seed{seed}').resolve()}", f"method.slots={spread(T, k)}"]
                elif kind == "heterogeneous_first_k":
                    over += ["method.source=stored", f"method.from_run={(out / f'supsup-seed{seed}').resolve()}", "method.impression_tasks=first_k"]
                elif kind == "homogeneous" and k == kmax:
                    over += ["method.source=homogeneous"]
                elif kind == "homogeneous":
                    over += ["method.source=stored", f"method.from_run={(out / donor).resolve()}", f"method.slots={list(range(k))}"]
                else:
                    over += ["method.source=random"]
                name = donor if (kind == "homogeneous" and k == kmax) else f"il-{kind}-k{k}-seed{seed}"
                r = compact(train(f"impresslearn/{kind}", spec.impresslearn, name, over, spec.quick_il))
                impression_tasks = {"heterogeneous": spread(T, k), "heterogeneous_first_k": list(range(k)), "homogeneous": [0]}.get(kind, [])
                r["impression_tasks"] = impression_tasks
                new = [j for j in range(T) if j not in impression_tasks]
                r["new_tasks"] = new
                r["new_acc"] = sum(r["final_accs"][j] for j in new) / len(new) if new else None
                r["supsup_new_acc"] = sum(sup["final_accs"][j] for j in new) / len(new) if new else None
                il[kind][str(k)] = r
            il[kind] = {str(k): il[kind][str(k)] for k in ks if str(k) in il[kind]}
            log(f"[cl:{scenario}] seed {seed}: ImpressLearn {KIND_LABELS[kind]} " + ", ".join(f"k={k} {v['avg_acc']:.3f}" for k, v in il[kind].items()))
        rec["impresslearn"] = il
        k = spec.authors_k
        if not quick and k <= T:
            rec["impresslearn_recipes"] = {}
            common = base + [f"name=impresslearn-{scenario}", f"method.impressions={k}", "inference=null"]
            for recipe in RECIPE_NAMES:
                if recipe == "authors_cifar":  # on the spread SupSup masks, beside kbricks' coefficient settings
                    over, tasks = ["method.source=stored", f"method.from_run={(out / f'supsup-seed{seed}').resolve()}",
                                   f"method.slots={spread(T, k)}"], spread(T, k)
                    name = f"il-heterogeneous-k{k}-authors_cifar-seed{seed}"
                else:  # learns its own impressions on the first k tasks (top 25 % by raw score), as the authors' MNIST code
                    over, tasks = ["method.source=heterogeneous", "method.per_task=1", "method.seed_tasks=refit"], list(range(k))
                    name = f"il-first_k-k{k}-authors_mnist-seed{seed}"
                r = compact(train(f"impresslearn/{recipe}", spec.impresslearn, name, common + over + recipe_overrides(recipe) + [f"method.recipe={recipe}"]))
                new = [j for j in range(T) if j not in tasks]
                r.update(k=k, impression_tasks=tasks, new_acc=sum(r["final_accs"][j] for j in new) / len(new) if new else None,
                         supsup_new_acc=sum(sup["final_accs"][j] for j in new) / len(new) if new else None)
                rec["impresslearn_recipes"][recipe] = r
        seeds_out.append(rec)

    summary = {"study": f"cl-{scenario}", "title": spec.title, "seeds": list(seeds), "quick": quick, "ks": list(ks),
               "compare": list(compare), "minutes": round((time.time() - t_start) / 60, 2),
               "minutes_by_part": {k: round(v, 2) for k, v in minutes.items()},
               "wall_minutes_this_call": {k: round(v, 2) for k, v in wall.items()}, "runs": seeds_out}
    write_study(out / "study.json", summary)
    plot_accuracy_vs_k(summary, out / f"cl_{scenario}_accuracy_vs_k.png")
    return summary


def impression_alone(run_dir: Path) -> Dict[str, Any]:
    """Every SupSup mask on every task: the diagonal (own task) and the rest, and the mean by task distance."""
    from ..continual.impresslearn import mask_transfer_matrix
    from ..engine.continual import load_continual_run

    A = mask_transfer_matrix(load_continual_run(run_dir))
    T = len(A)
    off = [A[i][j] for i in range(T) for j in range(T) if i != j]
    by_distance: Dict[str, float] = {}
    for d in range(1, T):
        vals = [A[i][j] for i in range(T) for j in range(T) if min(abs(i - j), T - abs(i - j)) == d]
        if vals:
            by_distance[str(d)] = sum(vals) / len(vals)
    return {"diagonal": sum(A[i][i] for i in range(T)) / T, "off_diagonal": sum(off) / len(off) if off else None,
            "by_distance": by_distance}


def run_cl_scale_study(seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                       configs: Optional[Path] = None) -> Dict[str, Any]:
    """SupSup on 250 PermutedMNIST-5k tasks: GG accuracy, one-shot inference over all 250 packed masks, storage."""
    root = configs_root(configs)
    out = Path(out) / "cl" / "scale"
    t0 = time.time()
    runs = []
    for seed in seeds:
        r = train_or_reuse(root / SCALE_CONFIG, out / f"supsup-seed{seed}", [f"seed={seed}", *(SCALE_QUICK if quick else [])])
        rec = compact(r)
        rec.pop("final_accs", None)
        rec["num_tasks"] = len(r["final_accs"])
        rec["min_task_acc"] = min(r["final_accs"])
        ckpt = out / f"supsup-seed{seed}" / "ckpt" / "last.pt"
        rec["checkpoint_bytes"] = ckpt.stat().st_size
        runs.append(rec)
        log(f"[cl:scale] seed {seed}: {rec['num_tasks']} tasks, avg acc {r['avg_acc']:.4f}, one-shot 16 img "
            f"{r.get('task_inference/one_shot/16img', float('nan')):.4f}")
    summary = {"study": "cl-scale", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2), "runs": runs}
    write_study(out / "study.json", summary)
    return summary


# ---- reading study.json ----------------------------------------------------------------------------------------


def _study(runs: Path, scenario: str) -> Optional[Dict[str, Any]]:
    return read_study(Path(runs) / "cl" / scenario / "study.json")


def _values(study: Dict[str, Any], path: Sequence[str]) -> List[float]:
    """One number per seed, following ``path`` into each seed's record (missing -> skipped)."""
    out = []
    for rec in study["runs"]:
        v: Any = rec
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
            if v is None:
                break
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def _ms(study, path) -> Optional[Dict[str, float]]:
    v = _values(study, path)
    return mean_std(v) if v else None


# ---- claims (verdict rules fixed before any number was read; they are stated in each claim's text) ------------


def cl_forgetting(runs: Path) -> Optional[Verdict]:
    studies = {s: _study(runs, s) for s in CL_SCENARIOS}
    studies = {k: v for k, v in studies.items() if v}
    if not studies:
        return None
    masked, dense = [], []
    for st in studies.values():
        for rec in st["runs"]:
            masked.append(rec["supsup"]["forgetting"])
            masked += [r["forgetting"] for kind in ("heterogeneous", "random") for r in rec["impresslearn"][kind].values()]
            dense.append(rec["finetune"]["forgetting"])
    text = (f"forgetting (max over {len(masked)} supermask runs) {max(masked):.4f}; dense fine-tuning "
            + ", ".join(f"{s} {fmt(_ms(st, ('finetune', 'forgetting')))}" for s, st in studies.items()) + " points")
    zero = all(f == 0.0 for f in masked)
    return ("holds" if zero and min(dense) >= 0.05 else ("partly" if zero else "does not hold")), text


def cl_params(runs: Path) -> Optional[Verdict]:
    parts, ok_entries, ok_bytes = [], True, True
    for scenario in ("permuted", "split"):
        st = _study(runs, scenario)
        if not st:
            continue
        rec = st["runs"][0]
        k = str(max(int(x) for x in rec["impresslearn"]["heterogeneous"]))
        sup, il = rec["supsup"], rec["impresslearn"]["heterogeneous"][k]
        re, rb = sup["params_per_task"] / il["params_per_task"], sup["bytes_per_task"] / il["bytes_per_task"]
        ok_entries &= re >= 100
        ok_bytes &= rb >= 100
        parts.append(f"{scenario}: SupSup {sup['params_per_task']:,.0f} mask bits ({sup['bytes_per_task']:,.0f} B) vs ImpressLearn k={k} "
                     f"{il['params_per_task']:.0f} coefficients ({il['bytes_per_task']:,.0f} B, BN statistics counted): "
                     f"{re:,.0f}x fewer entries, {rb:,.0f}x fewer bytes")
    if not parts:
        return None
    return ("holds" if ok_entries and ok_bytes else ("partly" if ok_entries else "does not hold")), "; ".join(parts)


def cl_combination(runs: Path, scenario: str, k: int) -> Optional[Verdict]:
    """Heterogeneous impressions at k on the tasks that are not impressions, against SupSup's dedicated masks on the
    same tasks: holds within 2 points in every seed, partly within 5 on average."""
    st = _study(runs, scenario)
    if not st or str(k) not in st["runs"][0]["impresslearn"]["heterogeneous"]:
        return None
    text, verdict = [], None
    for kind in ("heterogeneous", "heterogeneous_first_k"):  # the rule reads the spread choice; first k is shown beside it
        if str(k) not in st["runs"][0]["impresslearn"].get(kind, {}):
            text.append(f"{KIND_LABELS[kind]}: not run in this study")
            continue
        gaps = [100 * (rec["impresslearn"][kind][str(k)]["supsup_new_acc"] - rec["impresslearn"][kind][str(k)]["new_acc"]) for rec in st["runs"]]
        new = len(st["runs"][0]["impresslearn"][kind][str(k)].get("new_tasks", [])) or "?"
        text.append(f"{KIND_LABELS[kind]} impressions, k={k}, on the {new} new tasks per seed {fmt(_ms(st, ('impresslearn', kind, str(k), 'new_acc')))} "
                    f"vs SupSup {fmt(_ms(st, ('impresslearn', kind, str(k), 'supsup_new_acc')))} (gap {fmt(mean_std(gaps), 1)} points)")
        if kind == "heterogeneous":
            verdict = grade(all(g <= 2 for g in gaps), mean_std(gaps)["mean"] <= 5)
    return None if verdict is None else (verdict, "; ".join(text))


def cl_homogeneous(runs: Path) -> Optional[Verdict]:
    st = _study(runs, "rotated")
    if not st:
        return None
    k = str(max(st["ks"]))
    gaps = [100 * (rec["impresslearn"]["heterogeneous"][k]["avg_acc"] - rec["impresslearn"]["homogeneous"][k]["avg_acc"]) for rec in st["runs"]]
    first = _ms(st, ("impresslearn", "heterogeneous_first_k", k, "avg_acc"))
    text = (f"RotatedMNIST k={k}: homogeneous {fmt(_ms(st, ('impresslearn', 'homogeneous', k, 'avg_acc')))} vs heterogeneous, spread "
            f"{fmt(_ms(st, ('impresslearn', 'heterogeneous', k, 'avg_acc')))} (gap {fmt(mean_std(gaps), 1)} points; heterogeneous, first k "
            f"{fmt(first) if first else 'not run'})")
    return grade(all(g <= 2 for g in gaps), mean_std(gaps)["mean"] <= 5), text


def cl_random(runs: Path) -> Optional[Verdict]:
    st = _study(runs, "rotated")
    if not st:
        return None
    k = "10" if "10" in st["runs"][0]["impresslearn"]["random"] else str(max(st["ks"]))
    acc = {kind: _values(st, ("impresslearn", kind, k, "avg_acc")) for kind in KINDS}
    below = [r < min(h, o) for r, h, o in zip(acc["random"], acc["heterogeneous"], acc["homogeneous"])]
    mean = {kind: mean_std(v)["mean"] for kind, v in acc.items() if v}
    text = f"RotatedMNIST k={k}: " + ", ".join(f"{KIND_LABELS[kind]} {100 * m:.2f}" for kind, m in mean.items())
    return grade(all(below), mean["random"] < min(mean["heterogeneous"], mean["homogeneous"])), text


def cl_alone(runs: Path) -> Optional[Verdict]:
    st = _study(runs, "permuted")
    if not st:
        return None
    off = _values(st, ("impression_alone", "off_diagonal"))
    text = (f"PermutedMNIST: a SupSup mask on another task {fmt(mean_std(off))}% (on its own task "
            f"{fmt(_ms(st, ('impression_alone', 'diagonal')))}%; chance 10%)")
    return grade(all(v <= 0.2 for v in off), mean_std(off)["mean"] <= 0.2), text


def cl_inference(runs: Path) -> Optional[Verdict]:
    st = _study(runs, "permuted")
    if not st or not _values(st, ("supsup", "task_inference/one_shot/16img")):
        return None
    one, six = _values(st, ("supsup", "task_inference/one_shot/1img")), _values(st, ("supsup", "task_inference/one_shot/16img"))
    first = _ms(st, ("supsup", "task_inference/one_shot/first_image"))
    trials = st["runs"][0]["supsup"].get("inference_trials_per_task", 0)
    text = (f"official recipe, {trials} trials/task x {len(one)} seeds: 1 image {fmt(mean_std(one))}%, 16 images {fmt(mean_std(six))}%; "
            f"one fixed image per task (the notebook's measure) {fmt(first)}%")
    return grade(all(s >= 0.99 and o >= 0.85 for s, o in zip(six, one)), mean_std(six)["mean"] >= 0.99 and mean_std(one)["mean"] >= 0.85), text


def cl_missing_id(runs: Path, scenario: str = "permuted") -> Optional[Verdict]:
    st = _study(runs, scenario)
    if not st:
        return None
    kind, k = st["compare"]
    n = "16img" if scenario != "rotated" else "128img"
    il = _values(st, ("impresslearn", kind, str(k), f"gns_acc/refit_nearest/{n}"))
    sup = _values(st, ("supsup", f"gns_acc/one_shot/{n}"))
    if not il or not sup:
        return None
    one = _ms(st, ("impresslearn", kind, str(k), f"gns_acc/one_shot/{n}"))
    text = (f"{scenario}, {n[:-3]} images, label accuracy: ImpressLearn ({KIND_LABELS[kind]}, k={k}) re-fit from the nearest alpha {fmt(mean_std(il))}% vs "
            f"SupSup one-shot {fmt(mean_std(sup))}% (ImpressLearn one-shot over its combinations {fmt(one)}%)")
    return grade(all(a >= b for a, b in zip(il, sup)), mean_std(il)["mean"] >= mean_std(sup)["mean"]), text


def cl_scale(runs: Path) -> Optional[Verdict]:
    st = _study(runs, "scale")
    if not st:
        return None
    r = st["runs"][0]
    gg, gnu = r["avg_acc"], r.get("gnu_acc/one_shot/16img")
    if gnu is None:
        return None
    text = (f"{r['num_tasks']} tasks: GG {100 * gg:.2f}%, one-shot task id {100 * r['task_inference/one_shot/16img']:.1f}% (16 images), "
            f"{100 * r['task_inference/one_shot/1img']:.1f}% (1 image), GNu {100 * gnu:.2f}%; {1e3 * r['seconds_per_inference/one_shot/16img']:.0f} ms "
            f"per inference; {r['bytes_per_task']:,.0f} B per task")
    return grade(gg - gnu <= 0.05, gg - gnu <= 0.15), text


CL_CLAIMS: List[Claim] = [
    Claim("SupSup/ImpressLearn", "No forgetting: old tasks are unchanged by later tasks, while a dense network fine-tuned task after task "
          "forgets (rule: every supermask run 0, dense >= 5 points in every seed)", cl_forgetting),
    Claim("ImpressLearn", "Orders of magnitude fewer parameters per task than SupSup (rule: >= 100x in entries and in bytes, BN "
          "statistics counted)", cl_params),
    Claim("ImpressLearn", "A combination of a few impressions is comparable to a dedicated mask on related tasks (rule: RotatedMNIST, 10 "
          "heterogeneous impressions spread over the sequence, tasks that are not impressions, within 2 points of SupSup; the authors' "
          "first-k choice shown beside)", lambda r: cl_combination(r, "rotated", 10)),
    Claim("ImpressLearn", "Same on unrelated tasks (rule: PermutedMNIST, 3 heterogeneous impressions spread over the sequence, the new "
          "tasks within 2 points of SupSup; the study runs 13 tasks since issue 26, 10 new ones per seed, and the evidence says how many new tasks the committed runs had; first k shown beside)",
          lambda r: cl_combination(r, "permuted", 3)),
    Claim("ImpressLearn", "Enough homogeneous impressions approach heterogeneous ones (rule: RotatedMNIST at the largest k, within 2 points "
          "of the spread heterogeneous ones)", cl_homogeneous),
    Claim("ImpressLearn", "Random impressions lag behind heterogeneous and homogeneous ones (rule: RotatedMNIST k=10, below both; "
          "heterogeneous: spread)", cl_random),
    Claim("ImpressLearn", "An impression alone on a task it was not trained for is near chance (rule: PermutedMNIST, <= chance + 10 points)",
          cl_alone),
    Claim("SupSup", "One-shot task inference identifies the task (notebook: 100% from 1 image on PermutedMNIST; rule: >= 99% from 16 "
          "images and >= 85% from 1 image)", cl_inference),
    Claim("ImpressLearn", "Without a task id, re-fitting the coefficients is a favourable alternative to SupSup's one-shot rule (rule: "
          "PermutedMNIST, label accuracy on the same batches, >= SupSup)", cl_missing_id),
    Claim("SupSup", "Inference without the task id stays close to GG at 250 tasks (rule: GNu within 5 points of GG from 16 images)", cl_scale),
]


# ---- tables and plots --------------------------------------------------------------------------------------------


def section(runs: Path) -> List[str]:
    lines: List[str] = []
    for scenario in CL_SCENARIOS:
        lines += scenario_tables(runs, scenario)
    return lines + scale_table(runs)


def scenario_tables(runs: Path, scenario: str) -> List[str]:
    st = _study(runs, scenario)
    if not st:
        return []
    n, rec0 = len(st["seeds"]), st["runs"][0]
    T = len(rec0["supsup"]["final_accs"])
    mins = st.get("minutes_by_part", {})
    lines = [f"## Continual learning on {st['title']}", "",
             f"{n} seed{'s (mean ± std)' if n > 1 else ' (± 0: one seed)'}, {T} tasks. Training + inference time of the study's runs, summed over seeds (1 thread, "
             f"2-core CPU shared with other jobs): {sum(mins.values()):.0f} minutes ({', '.join(f'{k} {v:.1f}' for k, v in mins.items())}).", "",
             "| method | avg accuracy % | forgetting (points) | BWT (points) | stored per task | bytes per task | shared |",
             "|---|---|---|---|---|---|---|"]

    def row(name, path, shared=""):
        lines.append(f"| {name} | {fmt(_ms(st, (*path, 'avg_acc')))} | {fmt(_ms(st, (*path, 'forgetting')))} | {fmt(_ms(st, (*path, 'bwt')))} | "
                     f"{_ms(st, (*path, 'params_per_task'))['mean']:,.0f} | {_ms(st, (*path, 'bytes_per_task'))['mean']:,.0f} | {shared} |")

    row("SupSup (a mask per task)", ("supsup",), "frozen random weights")
    for kind in KINDS:
        runs_k = rec0["impresslearn"].get(kind, {})
        for k, r in runs_k.items():
            if int(k) == max(int(x) for x in runs_k):
                row(f"ImpressLearn {KIND_LABELS[kind]} k={k}", ("impresslearn", kind, k), f"{r.get('impression_bytes', 0):,.0f} B of impressions")
    fine = rec0["finetune"]
    row("dense fine-tuning", ("finetune",), f"{fine.get('shared_params', 0):,} trained weights")
    lines += ["", f"ImpressLearn accuracy (%) against the number of impressions k: all {T} tasks / the tasks that are not impressions "
              "(heterogeneous: SupSup masks of tasks spread over the sequence, or of the first k tasks as the authors choose; "
              "homogeneous: task 0). SupSup's dedicated masks: "
              f"{fmt(_ms(st, ('supsup', 'avg_acc')))}; dense fine-tuning {fmt(_ms(st, ('finetune', 'avg_acc')))}.", "",
              "| impressions | " + " | ".join(f"k={k}" for k in st["ks"]) + " |", "|---|" + "---|" * len(st["ks"])]
    for kind in KINDS:
        if kind not in rec0["impresslearn"]:
            lines.append(f"| {KIND_LABELS[kind]} | " + " | ".join("not run" for _ in st["ks"]) + " |")
            continue
        cells = []
        for k in st["ks"]:
            a = _ms(st, ("impresslearn", kind, str(k), "avg_acc"))
            b = _ms(st, ("impresslearn", kind, str(k), "new_acc"))
            cells.append("—" if a is None else f"{fmt(a)} / {fmt(b) if b else '—'}")
        lines.append(f"| {KIND_LABELS[kind]} | " + " | ".join(cells) + " |")
    for kind in ("heterogeneous", "heterogeneous_first_k"):
        if kind in rec0["impresslearn"]:
            sup_new = [_ms(st, ("impresslearn", kind, str(k), "supsup_new_acc")) for k in st["ks"]]
            lines.append(f"| SupSup on the new tasks ({KIND_LABELS[kind]}) | " + " | ".join(fmt(s) if s else "—" for s in sup_new) + " |")
    lines += recipe_lines(st)
    alone = [(d, _ms(st, ("impression_alone", "by_distance", d))) for d in list(rec0["impression_alone"]["by_distance"])[:6]]
    lines += ["", f"Impression alone (a SupSup mask on another task's test set, %): own task {fmt(_ms(st, ('impression_alone', 'diagonal')))}, "
              f"other tasks {fmt(_ms(st, ('impression_alone', 'off_diagonal')))}; by distance in the sequence: "
              + ", ".join(f"{d}: {fmt(m)}" for d, m in alone) + "."]
    lines += missing_id_table(st) + [f"![accuracy vs k](plots/cl_{scenario}_accuracy_vs_k.png)", ""]
    return lines


def recipe_lines(st: Dict[str, Any]) -> List[str]:
    """kbricks' coefficient settings against the authors' two recipes at one k (older studies ran only the CIFAR one,
    under the key ``impresslearn_authors``)."""
    rec0 = st["runs"][0]
    recipes = {"authors_cifar": ("impresslearn_authors",)} if "impresslearn_authors" in rec0 else {}
    recipes.update({name: ("impresslearn_recipes", name) for name in rec0.get("impresslearn_recipes", {})})
    if not recipes:
        return []
    k = str((rec0.get("impresslearn_authors") or next(iter(rec0["impresslearn_recipes"].values())))["k"])
    path = ("impresslearn", "heterogeneous", k)
    said = {"authors_cifar": "the authors' CIFAR recipe on the same spread impressions (1/k, seed tasks at their own mask, Adam 0.02 "
                             "wd 0.01, no guard)",
            "authors_mnist": "the authors' MNIST recipe with its own impressions, the first k tasks' masks keeping the top 25 % by raw "
                             "score (1/k, RMSprop 1e-3 for 938 steps, cross-entropy only, no guard)"}
    parts = [f"{said[name]} {fmt(_ms(st, (*p, 'avg_acc')))} (new tasks {fmt(_ms(st, (*p, 'new_acc')))})" for name, p in recipes.items()]
    kept = ", ".join(f"{KIND_LABELS[kind]} {100 * _ms(st, ('impresslearn', kind, k, 'alpha_kept_learned'))['mean']:.0f}%"
                     for kind in KINDS if _ms(st, ("impresslearn", kind, k, "alpha_kept_learned")))
    return ["", f"Coefficient fitting at k={k}: kbricks' settings on the spread impressions (start from the best of 1/k and each single "
            f"impression, keep the learned alpha only if it is at least as accurate on the training data, Adam 0.05) {fmt(_ms(st, (*path, 'avg_acc')))} "
            f"(new tasks {fmt(_ms(st, (*path, 'new_acc')))}); " + "; ".join(parts)
            + ("" if "authors_mnist" in recipes else "; the authors' MNIST recipe: not run in this study")
            + (f". Learned alphas kept by the guard: {kept}." if kept else ".")]


def missing_id_table(st: Dict[str, Any]) -> List[str]:
    kind, k = st["compare"]
    il = st["runs"][0]["impresslearn"][kind].get(str(k), {})
    sizes = sorted({key.split("/")[-1] for key in st["runs"][0]["supsup"] if key.startswith("task_inference/") and key.endswith("img")},
                   key=lambda s: int(s[:-3]))
    if not sizes:
        return []
    trials = st["runs"][0]["supsup"].get("inference_trials_per_task")
    lines = ["", f"Without the task id ({trials} random test batches per task and size for SupSup's rules; the same batches for "
             f"ImpressLearn {KIND_LABELS[kind]} k={k}; its re-fit rules on the first {il.get('inference_refit_trials_per_task', 'few')} of them per task): task-id accuracy / label accuracy (% ; GNu: a wrong task "
             "counts as wrong, GNs: classified with the inferred task).", "",
             "| rule | " + " | ".join(f"{s[:-3]} img: task id | GNu | GNs" for s in sizes) + " | ms per inference |",
             "|---|" + "---|---|---|" * len(sizes) + "---|"]

    def row(name, path, rule):
        cells = []
        for s in sizes:
            cells += [fmt(_ms(st, (*path, f"task_inference/{rule}/{s}"))), fmt(_ms(st, (*path, f"gnu_acc/{rule}/{s}"))),
                      fmt(_ms(st, (*path, f"gns_acc/{rule}/{s}")))]
        ms = _ms(st, (*path, f"seconds_per_inference/{rule}/{sizes[-1]}"))
        if any(c != "n/a" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + (f" | {1e3 * ms['mean']:.1f} |" if ms else " | n/a |"))

    row("SupSup one-shot", ("supsup",), "one_shot")
    row("SupSup binary", ("supsup",), "binary")
    if "supsup_g" in st["runs"][0]:
        row("SupSup one-shot, G objective (100 outputs)", ("supsup_g",), "one_shot")
        row("SupSup binary, G objective (100 outputs)", ("supsup_g",), "binary")
    for rule, name in (("one_shot", "one-shot over combined masks"), ("binary", "binary over combined masks"),
                       ("refit_uniform", "re-fit alpha from 1/k"), ("refit_nearest", "re-fit alpha from the nearest stored alpha")):
        if any(key.startswith(f"gns_acc/{rule}/") for key in il):
            row(f"ImpressLearn {name}", ("impresslearn", kind, str(k)), rule)
    if "supsup_g" in st["runs"][0]:
        lines += ["", f"SupSup with the superfluous-neuron head (GG accuracy {fmt(_ms(st, ('supsup_g', 'avg_acc')))}%, "
                  f"{_ms(st, ('supsup_g', 'params_per_task'))['mean']:,.0f} mask bits per task)."]
    first = _ms(st, ("supsup", "task_inference/one_shot/first_image"))
    if first:
        lines += ["", f"SupSup one-shot from each task's first test image alone (one fixed image per task, as the SupSup notebook "
                  f"measures its \"100% from 1 image\"): {fmt(first)}%."]
    return lines + [""]


def scale_table(runs: Path) -> List[str]:
    st = _study(runs, "scale")
    if not st:
        return []
    r = st["runs"][0]
    return ["## SupSup at scale: 250 PermutedMNIST-5k tasks", "",
            f"One seed, `kbricks study cl --scenario scale` ({st['minutes']:.1f} minutes; Adam lr 0.01, 93 steps per task).", "",
            "| tasks | GG accuracy % (worst task) | one-shot task id, 1 / 16 img % | GNu 16 img % | ms per inference (16 img) | bytes per task | checkpoint |",
            "|---|---|---|---|---|---|---|",
            f"| {r['num_tasks']} | {100 * r['avg_acc']:.2f} ({100 * r['min_task_acc']:.1f}) | {100 * r.get('task_inference/one_shot/1img', float('nan')):.1f} / "
            f"{100 * r.get('task_inference/one_shot/16img', float('nan')):.1f} | {100 * r.get('gnu_acc/one_shot/16img', float('nan')):.2f} | "
            f"{1e3 * r.get('seconds_per_inference/one_shot/16img', float('nan')):.0f} | {r['bytes_per_task']:,.0f} | {r['checkpoint_bytes'] / 2**20:.1f} MiB |", ""]


def plot_accuracy_vs_k(study: Dict[str, Any], path: Path) -> Optional[Path]:
    """Accuracy against k for the four kinds of impressions (mean ± std over seeds), all tasks and new tasks, with
    SupSup's dedicated masks and dense fine-tuning as reference lines."""
    try:
        plt = figure_api()
    except ImportError:  # matplotlib is an optional extra
        return None
    ks = study["ks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, title in zip(axes, ("avg_acc", "new_acc"), ("all tasks", "tasks that are not impressions")):
        for i, (kind, marker) in enumerate(zip(KINDS, "o^sD")):
            pts = [(k, _ms(study, ("impresslearn", kind, str(k), metric))) for k in ks]
            pts = [(k, m) for k, m in pts if m]
            if pts:
                ax.errorbar([k for k, _ in pts], [100 * m["mean"] for _, m in pts], yerr=[100 * m["std"] for _, m in pts],
                            marker=marker, color=f"C{i}", capsize=3, label=KIND_LABELS[kind])  # one colour per kind in every plot
        for name, key, style in (("SupSup", ("supsup", "avg_acc"), "--"), ("dense fine-tuning", ("finetune", "avg_acc"), ":")):
            m = _ms(study, key)
            if m:
                ax.axhline(100 * m["mean"], linestyle=style, color="gray", label=name)
        ax.set_xscale("log")
        ax.minorticks_off()  # a k range under one decade would label minor ticks ("2 x 10^0")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("impressions k")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ImpressLearn on {study['title']} ({len(study['seeds'])} seeds)")
    return save_figure(fig, path)


def copy_plots(runs: Path, dest: Path) -> None:
    """The accuracy-vs-k plot of each scenario, redrawn from its study.json."""
    for scenario in CL_SCENARIOS:
        st = _study(runs, scenario)
        if st:
            plot_accuracy_vs_k(st, Path(dest) / f"cl_{scenario}_accuracy_vs_k.png")


__all__ = ["CL_CLAIMS", "CL_SCENARIOS", "copy_plots", "run_cl_study", "run_cl_scale_study", "section"]

"""``kbricks reproduce``: run every study the project can do on CPU and write results/REPRODUCTION.md.

Each claim names the paper's statement, extracts our number from the studies' outputs (mean +/- std over seeds)
and applies a verdict rule written down before the numbers are seen: holds / partly / does not hold.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core.stats import fmt_values as _ms
from ..core.stats import mean_std
from .cl import run_cl_study
from .common import read_study
from .kf import run_kf_study
from .sskt import run_sskt_study
from .tables import write_results

Verdict = Tuple[str, str]  # (verdict, our number as text)


def _kf_reports(runs: Path, dataset: str) -> Optional[List[Dict[str, Any]]]:
    study = read_study(runs / "kf" / dataset / "study.json")
    return study["reports"] if study else None


def _grade(ok_all: bool, ok_mean: bool) -> str:
    return "holds" if ok_all else ("partly" if ok_mean else "does not hold")


def kf_factor_claim(dataset: str) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _kf_reports(runs, dataset)
        if not reps:
            return None
        gaps = [max(r[f"teacher/acc_{t}"] - r[f"kf/acc_{t}"] for t in r["tasks"]) for r in reps]
        text = f"worst task: teacher − factor = {_ms(gaps)} points ({len(reps)} seeds)"
        return _grade(all(g <= 0.01 for g in gaps), statistics.mean(gaps) <= 0.01), text
    return check


def kf_assembled_claim(dataset: str) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _kf_reports(runs, dataset)
        if not reps:
            return None
        d = [r["assembled/acc"] - r["teacher/acc"] for r in reps]
        same = all(r["assembled_matches_factors"] for r in reps)
        text = f"assembled − teacher = {_ms(d)} points; assembled from bricks == trained factors: {same}"
        return _grade(all(x >= -0.01 for x in d) and same, statistics.mean(d) >= -0.01), text
    return check


def kf_pair_claim(key_kf: str, key_kd: str, label: str, scale: float = 100.0, digits: int = 2) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _kf_reports(runs, "dsprites")
        if not reps or key_kf not in reps[0]:
            return None
        kf, kd = [r[key_kf] for r in reps], [r[key_kd] for r in reps]
        diff = [a - b for a, b in zip(kf, kd)]
        return _grade(all(x > 0 for x in diff), statistics.mean(diff) > 0), f"{label}: KF {_ms(kf, scale, digits)} vs KD {_ms(kd, scale, digits)} (higher in KF in {sum(x > 0 for x in diff)}/{len(diff)} seeds)"
    return check


def _cl(runs: Path, scenario: str = "permuted") -> Optional[Dict[str, Any]]:
    study = read_study(runs / "cl" / scenario / "study.json")
    return study["methods"] if study else None


def cl_forgetting(runs: Path) -> Optional[Verdict]:
    m = _cl(runs)
    if not m:
        return None
    f = {k: v["forgetting"]["mean"] for k, v in m.items()}
    return ("holds" if all(x == 0.0 for x in f.values()) else "does not hold"), "forgetting: " + ", ".join(f"{k} {v:.4f}" for k, v in f.items())


def cl_params(runs: Path) -> Optional[Verdict]:
    m = _cl(runs)
    if not m:
        return None
    sup, il = m["supsup"], m["impresslearn_k3"]
    ratio_entries = sup["params_per_task"]["mean"] / il["params_per_task"]["mean"]
    ratio_bytes = sup["bytes_per_task"]["mean"] / il["bytes_per_task"]["mean"]
    text = f"SupSup {sup['params_per_task']['mean']:,.0f} mask bits vs ImpressLearn {il['params_per_task']['mean']:.0f} coefficients per task: {ratio_entries:,.0f}x fewer entries, {ratio_bytes:,.0f}x fewer bytes"
    return ("holds" if ratio_entries >= 100 and ratio_bytes >= 100 else "partly"), text


def cl_accuracy(runs: Path, scenario: str = "permuted") -> Optional[Verdict]:
    m = _cl(runs, scenario)
    if not m:
        return None
    sup, il = m["supsup"], m["impresslearn_k3"]
    gap = 100 * (sup["avg_acc"]["mean"] - il["avg_acc"]["mean"])
    new = [100 * (a - b) for a, b in zip(sup["final_accs_mean"][3:], il["final_accs_mean"][3:])]
    text = (f"avg acc SupSup {100 * sup['avg_acc']['mean']:.2f} vs ImpressLearn (k=3) {100 * il['avg_acc']['mean']:.2f} (gap {gap:.2f}); "
            f"on the new tasks (not impressions) the gap is {', '.join(f'{g:.1f}' for g in new)} points")
    return ("holds" if gap <= 2 else ("partly" if gap <= 5 else "does not hold")), text


def cl_inference(runs: Path) -> Optional[Verdict]:
    m = _cl(runs)
    if not m or "task_inference/one_shot/16img" not in m["supsup"]:
        return None
    s = m["supsup"]
    one, sixteen = s["task_inference/one_shot/1img"]["mean"], s["task_inference/one_shot/16img"]["mean"]
    text = f"SupSup one-shot task id accuracy: 1 image {100 * one:.1f}%, 16 images {100 * sixteen:.1f}%"
    return ("holds" if sixteen >= 0.99 and one >= 0.85 else ("partly" if sixteen >= 0.9 else "does not hold")), text


def _sskt(runs: Path) -> Optional[Dict[str, Any]]:
    study = read_study(runs / "sskt" / "study.json")
    return study["methods"] if study else None


def sskt_vs(other: str, want_better: bool = True) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        m = _sskt(runs)
        if not m:
            return None
        best = "sskt_I+P"
        a = [r["last_acc"] for r in m[best]["runs"]]
        b = [r["last_acc"] for r in m[other]["runs"]]
        d = [x - y for x, y in zip(a, b)]
        wins = sum(x > 0 for x in d)
        sem = mean_std(d)["sem"]
        text = f"SSKT (I+P) − {other} = {100 * statistics.mean(d):+.2f} ± {100 * sem:.2f} (s.e.m.), better in {wins}/{len(d)} paired seeds"
        mean_ok = statistics.mean(d) > 0 if want_better else statistics.mean(d) < 0
        strong = mean_ok and statistics.mean(d) > sem and (wins >= 0.6 * len(d) if want_better else wins <= 0.4 * len(d))
        return _grade(strong, mean_ok), text
    return check


def kd_source_control(runs: Path) -> Optional[Verdict]:
    m = _sskt(runs)
    if not m:
        return None
    d = [a["last_acc"] - b["last_acc"] for a, b in zip(m["kd_source"]["runs"], m["scratch"]["runs"])]
    text = f"KD from the cross-domain source − scratch = {_ms(d)} points; SSKT with the same source − scratch = {_ms([a['last_acc'] - b['last_acc'] for a, b in zip(m['sskt_I']['runs'], m['scratch']['runs'])])}"
    return _grade(all(x < 0 for x in d), statistics.mean(d) < 0), text


@dataclass
class Claim:
    area: str
    paper: str
    check: Callable[[Path], Optional[Verdict]]


CLAIMS: List[Claim] = [
    Claim("KF", "Each factor network performs on par with the teacher on its task (ECCV'22); issue bar: within 1 point, digits", kf_factor_claim("digits")),
    Claim("KF", "Same, MNIST-5k", kf_factor_claim("mnist5k")),
    Claim("KF", "Factor networks assemble into a multi-task network without fine-tuning; issue bar: within 1 point of the teacher, digits", kf_assembled_claim("digits")),
    Claim("KF", "Same, MNIST-5k", kf_assembled_claim("mnist5k")),
    Claim("KF", "Task-specific representations are more disentangled than a KD student's (dSprites; MIG)", kf_pair_claim("kf/mig", "kd/mig", "MIG (0-1)", 1.0, 3)),
    Claim("KF", "Common knowledge transfers better than KD-student features (linear probe of held-out pos_x)", kf_pair_claim("transfer/kf_ckn/pos_x", "transfer/kd/pos_x", "probe pos_x %")),
    Claim("KF", "Same for pos_y", kf_pair_claim("transfer/kf_ckn/pos_y", "transfer/kd/pos_y", "probe pos_y %")),
    Claim("SupSup/ImpressLearn", "No forgetting: old tasks are unchanged by later tasks (both methods)", cl_forgetting),
    Claim("ImpressLearn", "Orders of magnitude fewer parameters per task than SupSup", cl_params),
    Claim("ImpressLearn", "A combination of a few impressions is comparable to a dedicated mask; issue bar: within 2 points of SupSup, PermutedMNIST-5k", cl_accuracy),
    Claim("ImpressLearn", "Same on related tasks: RotatedMNIST-5k with 15° steps (the paper's preview setting)", lambda runs: cl_accuracy(runs, "rotated")),
    Claim("SupSup", "One-shot task inference identifies the task (notebook: 100% from 1 image on PermutedMNIST)", cl_inference),
    Claim("SSKT", "SSKT improves over training from scratch on a small target", sskt_vs("scratch")),
    Claim("SSKT", "SSKT beats KD from a teacher trained on the target", sskt_vs("kd_teacher")),
    Claim("SSKT", "SSKT beats MAXL", sskt_vs("maxl")),
    Claim("SSKT", "SSKT beats DML", sskt_vs("dml")),
    Claim("SSKT", "A mismatched source used as a KD teacher hurts; the auxiliary head makes it safe", kd_source_control),
]


def evaluate_claims(runs: Path) -> List[Dict[str, str]]:
    rows = []
    for c in CLAIMS:
        out = c.check(runs)
        verdict, ours = out if out else ("not run", "—")
        rows.append({"area": c.area, "paper": c.paper, "ours": ours, "verdict": verdict})
    return rows


def study_minutes(runs: Path) -> float:
    """Wall time the studies under ``runs`` recorded in their study.json files."""
    total = 0.0
    for path in sorted(Path(runs).rglob("study.json")):
        study = read_study(path)
        total += float(study.get("summary", study).get("minutes", 0.0))
    return total


def write_reproduction(runs: Path, out: Path, quick: bool) -> Path:
    """REPRODUCTION.md from the raw results alone (the same files always give the same bytes)."""
    rows = evaluate_claims(runs)
    lines = ["# Reproduction of the papers' claims", "",
             f"Generated by `kbricks report` from the studies' raw results (`{runs.as_posix()}/**/study.json`); the studies took "
             f"{study_minutes(runs):.1f} minutes of wall time on a 2-core CPU ({'quick budgets' if quick else 'full budgets'}). "
             "Each verdict rule is fixed in `src/kbricks/studies/claims.py` before the numbers are read: *holds* when it holds in "
             "every seed (or the issue's bar is met), *partly* when only on average, *does not hold* otherwise.", "",
             "| area | the paper's statement | ours (mean ± std over seeds) | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['area']} | {r['paper']} | {r['ours']} | **{r['verdict']}** |" for r in rows]
    lines += ["", "Full tables and plots: [RESULTS.md](RESULTS.md)." if not quick else "", ""]
    path = out / ("REPRODUCTION.md" if not quick else "REPRODUCTION-quick.md")
    path.write_text("\n".join(lines))
    return path


def readme_summary(runs: Path) -> str:
    """The claims table in README form (``make readme`` puts it between the README's results markers)."""
    rows = evaluate_claims(runs)
    lines = ["| area | claim | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['area']} | {r['paper']} | {r['ours']} | {r['verdict']} |" for r in rows]
    return "\n".join(lines)


def reproduce(quick: bool, out: Path = Path("results"), log: Callable[[str], None] = print, configs: Optional[Path] = None) -> Path:
    runs = out / ("runs-quick" if quick else "runs")
    t0 = time.time()
    seeds3 = [0, 1, 2]
    for dataset in (("digits", "dsprites") if quick else ("digits", "mnist5k", "dsprites")):
        run_kf_study(dataset, seeds3, runs, quick=quick, log=log, configs=configs)
    run_cl_study(seeds3, runs, quick=quick, log=log, configs=configs)
    run_cl_study(seeds3, runs, quick=quick, log=log, scenario="rotated", configs=configs)
    run_sskt_study(seeds3 if quick else [0, 1, 2, 3, 4], runs, quick=quick, log=log, configs=configs)
    log(f"[reproduce] studies took {(time.time() - t0) / 60:.1f} minutes")
    if not quick:
        write_results(runs, out)
    return write_reproduction(runs, out, quick)

"""The brick-library study (issue 25): bricks made later against a frozen CKN, and the amalgamation of two teachers.

For each seed, on digits or MNIST-5k (the shipped teacher / KF / KD configs, the KF study's budgets):

- **extend**: factorize the teacher on classes {0-4} only (one TSN), then train a TSN for {5-9} against that CKN,
  frozen (``kf_extend``), and assemble the two; compared with the joint factorization of all classes ({0-4}, {5-9}
  in one run). The CKN brick's file hashes before and after, and the extension run's CKN tensors, are recorded.
- **amalgamate**: two teachers, each trained on its own classes only ({0-4} and {5-9}: the dataset ``classes_of``),
  amalgamated into one CKN and two TSNs (``kf_amalgamate``), assembled into a 10-way classifier; compared with each
  teacher on its own classes and with a KD student of the KD config's size distilled from both (``kd_amalgamate``:
  the target is each teacher's tempered softmax placed at its classes, for the samples whose label is among them).

Every accuracy is measured the same way: the network on the raw test images, argmax over its outputs (a teacher of
five classes: over its five, on the test images of those classes).

Verdict rules, written before any run (``LIBRARY_CLAIMS``):
(a) extend within 1 point of joint: assembled(base {0-4} + extension {5-9}) >= joint assembled - 0.01 in every seed:
    holds; for the mean over seeds only: partly; otherwise does not hold.
(b) amalgamation within 1 point of each teacher on its own classes: for both teachers, the 10-way assembled accuracy on
    that teacher's test classes >= the teacher's accuracy there - 0.01, in every seed: holds; for the means: partly.
    Reported next to it, with its own rule: the amalgamation vs the same-size multi-teacher KD student over all ten
    classes: higher in every seed: holds; on the mean: partly.
(c) the CKN is unchanged bit for bit: in every seed, the CKN brick's two files hash the same after the extension as
    before, and every tensor of the extension run's trained CKN equals the brick's (torch.equal): holds; otherwise
    does not hold (no partly).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import yaml

from ..core.checkpoint import load_checkpoint
from ..core.metrics import argmax_accuracy
from ..core.stats import fmt_values, mean_of, summarize_runs
from ..data import DATASETS, ArrayDataset, DataSplits, load_dataset
from ..engine.experiment import load_config
from ..engine.sweep import train_or_reuse
from ..errors import ConfigError
from ..methods.kf.bricks import assemble, load_brick
from ..models.deploy import load_model
from .common import configs_root, read_study, write_study
from .kf import KF_QUICK, KF_STUDIES
from .verdicts import Claim, Verdict, grade

LOW, HIGH = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
LIBRARY_DATASETS = ("digits", "mnist5k")
TASK_LOW, TASK_HIGH = "classes_0-1-2-3-4", "classes_5-6-7-8-9"


@DATASETS.register("classes_of")
def classes_of(dataset: str, classes: Sequence[int], **kwargs) -> DataSplits:
    """``dataset`` restricted to ``classes``, relabelled 0..len(classes)-1 in that order (a teacher of some classes)."""
    base = load_dataset(dataset, **kwargs)
    cls = [int(c) for c in classes]

    def cut(ds: ArrayDataset) -> ArrayDataset:
        keep = torch.isin(ds.y, torch.tensor(cls)).nonzero().squeeze(1)
        lut = torch.full((int(ds.y.max()) + 1,), -1, dtype=torch.long)
        lut[cls] = torch.arange(len(cls))
        return ArrayDataset(ds.x[keep], lut[ds.y[keep]], [ds.classes[c] for c in cls])

    return DataSplits(cut(base.train), cut(base.test), name=f"{dataset}[{','.join(map(str, cls))}]")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_cfg(src: Path, dest: Path, edit: Callable[[Dict[str, Any]], None]) -> Path:
    cfg = yaml.safe_load(Path(src).read_text())
    edit(cfg)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def _acc_on(net, x: torch.Tensor, y: torch.Tensor, classes: Optional[Sequence[int]] = None, local: bool = False) -> float:
    """Accuracy on the samples of ``classes`` (all: None); ``local``: the network predicts 0..len(classes)-1."""
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
        if local:
            lut = torch.full((10,), -1, dtype=torch.long)
            lut[list(classes)] = torch.arange(len(classes))
            y = lut[y]
    return argmax_accuracy(net, x, y)


def _amalgamate_edit(entries: List[Dict[str, Any]]) -> Callable[[Dict[str, Any]], None]:
    """The KF config -> kf_amalgamate of ``entries`` (InfoMax: two views of the CKN; the teacher variant needs one teacher)."""
    def edit(cfg: Dict[str, Any]) -> None:
        cfg["method"].pop("teacher")
        cfg["method"].pop("infomax_layers", None)
        cfg["method"].update(name="kf_amalgamate", teachers=entries, infomax="views")
    return edit


def _kd_edit(entries: List[Dict[str, Any]]) -> Callable[[Dict[str, Any]], None]:
    """The KD config (its student size) -> kd_amalgamate of ``entries``."""
    def edit(cfg: Dict[str, Any]) -> None:
        cfg["method"].pop("teacher")
        cfg["method"].update(name="kd_amalgamate", teachers=[{"path": e["path"], "classes": e["classes"]} for e in entries])
    return edit


def run_library_study(dataset: str, seeds: Sequence[int], out: Path, quick: bool = False, log: Callable[[str], None] = print,
                      configs: Optional[Path] = None) -> Dict[str, Any]:
    if dataset not in LIBRARY_DATASETS:
        raise ConfigError(f"unknown library study {dataset!r}; valid: {', '.join(LIBRARY_DATASETS)}")
    root = configs_root(configs)
    teacher_cfg, kf_cfg, kd_cfg = (root / p for p in KF_STUDIES[dataset])
    data_kwargs = dict(load_config(teacher_cfg).data.kwargs)
    quick_over = KF_QUICK[dataset] if quick else []
    base_dir = Path(out) / "library" / dataset
    test = load_dataset(dataset, **data_kwargs).test
    x, y = test.x, test.y
    reports: List[Dict[str, Any]] = []
    t0 = time.time()
    for seed in seeds:
        over = [f"seed={seed}", *quick_over]
        d = base_dir / f"seed{seed}"
        teacher = d / "teacher"
        train_or_reuse(teacher_cfg, teacher, over)
        teach = [f"method.teacher={teacher}"]
        # (a) joint factorization, the {0-4} factorization, and its extension with {5-9} on the frozen CKN
        train_or_reuse(kf_cfg, d / "joint", over + teach)
        train_or_reuse(kf_cfg, d / "base", over + teach + [f"data.tasks={{partition: [{LOW}]}}"])
        ckn = d / "base" / "bricks" / "ckn.json"
        before = (_sha(ckn), _sha(ckn.with_suffix(".safetensors")))
        train_or_reuse(kf_cfg, d / "extend", over + teach + ["method.name=kf_extend", f"method.ckn={ckn}", f"data.tasks={{partition: [{HIGH}]}}"])
        after = (_sha(ckn), _sha(ckn.with_suffix(".safetensors")))
        _, brick = load_brick(ckn)
        state = load_checkpoint(d / "extend" / "ckpt" / "last.pt")["model"]
        trained = {k[len("factors.ckn."):]: v for k, v in state.items() if k.startswith("factors.ckn.")}
        same_tensors = set(trained) == set(brick) and all(torch.equal(trained[k], brick[k]) for k in brick)
        joint = assemble(d / "joint/bricks/ckn.json", [d / f"joint/bricks/tsn-{TASK_LOW}.json", d / f"joint/bricks/tsn-{TASK_HIGH}.json"])
        grown = assemble(ckn, [d / f"base/bricks/tsn-{TASK_LOW}.json", d / f"extend/bricks/tsn-{TASK_HIGH}.json"])
        r: Dict[str, Any] = {"teacher/acc": _acc_on(load_model(teacher), x, y), "joint/acc": _acc_on(joint, x, y),
                             "extend/acc": _acc_on(grown, x, y), "ckn_files_unchanged": before == after, "ckn_tensors_equal": same_tensors}
        # (b) two teachers of five classes each, amalgamated; the multi-teacher KD student of the same size
        entries = []
        for part, name in ((LOW, "low"), (HIGH, "high")):
            tdir = d / f"teacher_{name}"
            train_or_reuse(teacher_cfg, tdir, over + ["data.name=classes_of", f"data.kwargs={{dataset: {dataset}, classes: {part}}}"])
            entries.append({"path": str(tdir), "classes": part, "name": name})
            r[f"teacher_{name}/acc"] = _acc_on(load_model(tdir), x, y, part, local=True)

        train_or_reuse(_write_cfg(kf_cfg, d / "configs" / "amalgamate.yaml", _amalgamate_edit(entries)), d / "amalgamate", over)
        train_or_reuse(_write_cfg(kd_cfg, d / "configs" / "kd_both.yaml", _kd_edit(entries)), d / "kd_both", over)
        amal = assemble(d / "amalgamate/bricks/ckn.json", [d / f"amalgamate/bricks/tsn-{TASK_LOW}.json", d / f"amalgamate/bricks/tsn-{TASK_HIGH}.json"])
        kd = load_model(d / "kd_both")
        for part, name in ((LOW, "low"), (HIGH, "high")):
            r[f"amal/acc_{name}"] = _acc_on(amal, x, y, part)
            r[f"kd/acc_{name}"] = _acc_on(kd, x, y, part)
        r["amal/acc"], r["kd/acc"] = _acc_on(amal, x, y), _acc_on(kd, x, y)
        r["amal/params"] = sum(p.numel() for p in amal.parameters())
        r["kd/params"] = sum(p.numel() for p in kd.parameters())
        reports.append(r)
        log(f"[library:{dataset}] seed {seed}: joint {r['joint/acc']:.4f} extend {r['extend/acc']:.4f} ckn unchanged "
            f"{r['ckn_files_unchanged'] and r['ckn_tensors_equal']}; amalgamated {r['amal/acc']:.4f} (teachers on own classes "
            f"{r['teacher_low/acc']:.4f}/{r['teacher_high/acc']:.4f}, amalgamated {r['amal/acc_low']:.4f}/{r['amal/acc_high']:.4f}) KD {r['kd/acc']:.4f}")
    summary = {"study": f"library-{dataset}", "seeds": list(seeds), "quick": quick, "minutes": round((time.time() - t0) / 60, 2),
               "metrics": summarize_runs([{k: float(v) for k, v in r.items()} for r in reports])}
    write_study(base_dir / "study.json", {"summary": summary, "reports": reports})
    return summary


# ---- claims (rules in the module docstring, fixed before the runs) ------------------------------------------------


def _reports(runs: Path, dataset: str) -> Optional[List[Dict[str, Any]]]:
    study = read_study(Path(runs) / "library" / dataset / "study.json")
    return study["reports"] if study else None


def extend_claim(dataset: str) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _reports(runs, dataset)
        if not reps:
            return None
        d = [r["extend/acc"] - r["joint/acc"] for r in reps]
        text = (f"extended − joint = {fmt_values(d)} points (extended {fmt_values([r['extend/acc'] for r in reps])}%, joint "
                f"{fmt_values([r['joint/acc'] for r in reps])}%, teacher {fmt_values([r['teacher/acc'] for r in reps])}%; {len(reps)} seeds)")
        return grade(all(x >= -0.01 for x in d), mean_of(d) >= -0.01), text
    return check


def amalgamation_claim(dataset: str) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _reports(runs, dataset)
        if not reps:
            return None
        gaps = {n: [r[f"amal/acc_{n}"] - r[f"teacher_{n}/acc"] for r in reps] for n in ("low", "high")}
        text = (f"assembled 10-way on each teacher's classes − that teacher (5-way): {{0-4}} {fmt_values(gaps['low'])}, {{5-9}} "
                f"{fmt_values(gaps['high'])} points; 10-way accuracy: amalgamated {fmt_values([r['amal/acc'] for r in reps])}% "
                f"({reps[0]['amal/params']:,} parameters) vs KD student of both teachers {fmt_values([r['kd/acc'] for r in reps])}% "
                f"({reps[0]['kd/params']:,}); {len(reps)} seeds")
        ok_all = all(x >= -0.01 for g in gaps.values() for x in g)
        return grade(ok_all, all(mean_of(g) >= -0.01 for g in gaps.values())), text
    return check


def amalgamation_vs_kd_claim(dataset: str) -> Callable[[Path], Optional[Verdict]]:
    def check(runs: Path) -> Optional[Verdict]:
        reps = _reports(runs, dataset)
        if not reps:
            return None
        d = [r["amal/acc"] - r["kd/acc"] for r in reps]
        text = (f"amalgamated − KD student of both = {fmt_values(d)} points over ten classes (higher in {sum(x > 0 for x in d)}/{len(d)} seeds)")
        return grade(all(x > 0 for x in d), mean_of(d) > 0), text
    return check


def ckn_unchanged_claim(runs: Path) -> Optional[Verdict]:
    reps = [r for ds in LIBRARY_DATASETS for r in (_reports(runs, ds) or [])]
    if not reps:
        return None
    files = sum(bool(r["ckn_files_unchanged"]) for r in reps)
    tensors = sum(bool(r["ckn_tensors_equal"]) for r in reps)
    text = f"CKN brick files unchanged in {files}/{len(reps)} extensions; every trained CKN tensor == the brick's in {tensors}/{len(reps)}"
    return ("holds" if files == tensors == len(reps) else "does not hold"), text


LIBRARY_CLAIMS: List[Claim] = [
    Claim("KF library", "A TSN made later for new classes against a frozen CKN ({0-4}, then {5-9}), assembled with the earlier "
                        "brick, is within 1 point of a joint factorization of all classes (issue 25), digits", extend_claim("digits")),
    Claim("KF library", "Same, MNIST-5k", extend_claim("mnist5k")),
    Claim("KF library", "The CKN stays bit for bit as it was when bricks are added to it (files and tensors)", ckn_unchanged_claim),
    Claim("KF library", "Two teachers ({0-4}, {5-9}) amalgamated into one CKN assemble into a 10-way classifier within 1 point "
                        "of each teacher on its own classes (Shen et al. AAAI'19 setting, in small), digits", amalgamation_claim("digits")),
    Claim("KF library", "Same, MNIST-5k", amalgamation_claim("mnist5k")),
    Claim("KF library", "The amalgamation beats a same-size KD student distilled from both teachers (10-way), digits",
          amalgamation_vs_kd_claim("digits")),
    Claim("KF library", "Same, MNIST-5k", amalgamation_vs_kd_claim("mnist5k")),
]

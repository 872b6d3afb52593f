"""The KF evaluation report (``kbricks evaluate`` on a KF run): factor networks vs teacher vs KD student, assembly
from the brick store, disentanglement (MIG) and transfer of the common knowledge (linear probe on held-out
latents). The engine builds the experiment and loads the checkpoint; this module only measures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ...core.hooks import write_csv
from ...core.metrics import evaluate
from ...models.frozen import FrozenNetwork, load_frozen
from .analysis import linear_probe, mutual_info_gap, pca_project
from .bricks import assemble


class Predictor(nn.Module):
    """Adapts any callable network to the evaluator's ``predict`` interface."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], module: Optional[nn.Module] = None):
        super().__init__()
        self.fn, self.module = fn, module

    @torch.no_grad()
    def predict(self, x):
        return self.fn(x)


def teacher_predictor(teacher: FrozenNetwork, tasks) -> Predictor:
    def fn(x):
        out = teacher(x)
        if isinstance(out, list):
            return [out[teacher.task_names.index(t.name)] for t in tasks]
        return out

    return Predictor(fn, teacher)


@torch.no_grad()
def collect(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, transform, batch: int = 512) -> torch.Tensor:
    return torch.cat([fn(transform(x[i:i + batch], train=False)) for i in range(0, len(x), batch)])


def _prefixed(d: Dict[str, float], prefix: str) -> Dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in d.items()}


def kf_report(exp, run_dir: Path, baseline: Optional[Path] = None) -> Dict[str, Any]:
    """``exp``: the run's experiment (``engine.experiment.Experiment``) with its trained weights loaded."""
    run_dir = Path(run_dir)
    method, test, train, tasks, tf = exp.method.eval(), exp.data.test, exp.data.train, exp.tasks, exp.transform
    ev = lambda m, ts=tasks, ds=test: evaluate(m, ds, ts, tf, exp.device)  # noqa: E731

    report: Dict[str, Any] = {"run_dir": str(run_dir), "tasks": [t.name for t in tasks]}
    report.update(_prefixed(ev(method), "kf"))
    report.update(_prefixed(ev(teacher_predictor(method.teacher, tasks)), "teacher"))

    # assemble from the brick store on disk (no fine-tuning) and check it reproduces the trained factor networks
    bricks = run_dir / "bricks"
    tsn_paths = [bricks / f"tsn-{t.name}.json" for t in tasks]
    net = assemble(bricks / "ckn.json", tsn_paths)
    raw = lambda x, train=False: x  # noqa: E731  (the assembled network normalises its raw inputs itself)
    report.update(_prefixed(evaluate(Predictor(net), test, tasks, raw, exp.device), "assembled"))
    report["assembled_matches_factors"] = report["assembled/acc"] == report["kf/acc"]
    if all(t.classes is not None for t in tasks) and len(tasks) > 1:
        # every single brick, assembled alone: a classifier over its own classes, scored on those classes
        for t, path in zip(tasks, tsn_paths):
            solo = assemble(bricks / "ckn.json", [path])
            sub_global = test.subset(t.member_mask(test.y).nonzero().squeeze(1))
            report[f"assembled_single/{t.name}"] = evaluate(Predictor(solo), sub_global, [t], raw, exp.device)["acc"]

    kd = None
    if baseline is not None:
        kd = load_frozen(baseline, {"mean": tf.mean, "std": tf.std} if tf.mean is not None else None)
        report.update(_prefixed(ev(teacher_predictor(kd, tasks)), "kd"))
        report["kd/params"] = sum(p.numel() for p in kd.net.parameters())
    report["kf/params"] = sum(p.numel() for p in method.factors.parameters())
    report["teacher/params"] = sum(p.numel() for p in method.teacher.net.parameters())

    if test.latents is not None and all(t.latent is not None for t in tasks):
        task_cols = [t.latent for t in tasks]
        codes = lambda ds: collect(lambda x: torch.cat([tsn.encode(x)[0] for tsn in method.factors.tsns], 1), ds.x, tf)  # noqa: E731
        kf_codes = codes(test)
        report.update(_prefixed(mutual_info_gap(kf_codes.numpy(), test.latents[:, task_cols].numpy()), "kf"))
        held_out = [i for i in range(len(test.latent_names)) if i not in task_cols]
        feats = {"kf_ckn": method.factors.ckn.features, "teacher": method.teacher.features}
        if kd is not None:
            feats["kd"] = kd.features
            kd_tr, kd_te = pca_project(collect(kd.features, train.x, tf), collect(kd.features, test.x, tf), kf_codes.shape[1])
            report.update(_prefixed(mutual_info_gap(kd_te.numpy(), test.latents[:, task_cols].numpy()), "kd"))
        for name, fn in feats.items():
            ftr, fte = collect(fn, train.x, tf), collect(fn, test.x, tf)
            for col in held_out:
                latent = test.latent_names[col]
                report[f"transfer/{name}/{latent}"] = linear_probe(ftr, train.latents[:, col], fte, test.latents[:, col])
    (run_dir / "kf_report.json").write_text(json.dumps(report, indent=2))
    write_csv(run_dir / "kf_report.csv", [report_row(report)])
    return report


def report_row(report: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in report.items() if not isinstance(v, (list, dict))}



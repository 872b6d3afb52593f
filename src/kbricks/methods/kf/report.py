"""The KF evaluation report (``kbricks evaluate`` on a KF run): factor networks vs teacher vs KD student, assembly
from the brick store (its outputs compared with the trained factor networks' outputs, tensor by tensor), and for
latent-factor data one protocol for every representation: MIG / DCI / SAP on raw dimensions against the task
latents, and validated linear probes of the latents that were not KF tasks, with the teacher as a ceiling and
randomly initialised networks as floors. The engine builds the experiment and loads the checkpoint; this module
only measures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ...core.hooks import write_csv
from ...core.metrics import evaluate
from ...data import DataSplits, build_tasks
from ...models import create_model
from ...models.frozen import FrozenNetwork, build_from_card, load_frozen
from .analysis import linear_probe, representation_metrics
from .bricks import assemble


class Predictor(nn.Module):
    """Adapts any callable network to the evaluator's ``predict`` interface. Created in eval mode: the evaluator
    restores the mode it found, and a train-mode wrapper would leave the wrapped network's BatchNorm in train mode."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], module: Optional[nn.Module] = None):
        super().__init__()
        self.fn, self.module = fn, module
        self.eval()

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
def collect(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, transform, batch: int = 512):
    """``fn`` over ``x`` in batches (eval transform); tensors are concatenated, lists of tensors per entry."""
    outs = [fn(transform(x[i:i + batch], train=False)) for i in range(0, len(x), batch)]
    if isinstance(outs[0], (list, tuple)):
        return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]
    return torch.cat(outs)


def _prefixed(d: Dict[str, float], prefix: str) -> Dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in d.items()}


def outputs_match(a, b) -> float:
    """Largest absolute difference between two outputs (tensors or lists of tensors); inf where shapes differ or
    only one side is finite (-inf marks classes a factor does not cover)."""
    a, b = (a, b) if isinstance(a, (list, tuple)) else ([a], [b])
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape or not torch.equal(torch.isfinite(x), torch.isfinite(y)):
            return float("inf")
        fin = torch.isfinite(x)
        if not torch.equal(x[~fin], y[~fin]):
            return float("inf")
        if fin.any():
            worst = max(worst, (x[fin] - y[fin]).abs().max().item())
    return worst if len(a) == len(b) else float("inf")


def random_network(card_or_name, shape: Dict[str, int], seed: int, kwargs=None) -> FrozenNetwork:
    """A randomly initialised (seeded) network in eval mode: the floor of the representation comparisons."""
    torch.manual_seed(seed)
    net = build_from_card(card_or_name) if isinstance(card_or_name, dict) else create_model(card_or_name, num_classes=0, **shape, **(kwargs or {}))
    return FrozenNetwork(net)


def kf_report(exp, run_dir: Path, baseline: Optional[Path] = None) -> Dict[str, Any]:
    """``exp``: the run's experiment (``engine.experiment.Experiment``) with its trained weights loaded."""
    run_dir = Path(run_dir)
    method, test, tasks, tf = exp.method.eval(), exp.data.test, exp.tasks, exp.transform
    ev = lambda m, ts=tasks, ds=test: evaluate(m, ds, ts, tf, exp.device)  # noqa: E731

    report: Dict[str, Any] = {"run_dir": str(run_dir), "tasks": [t.name for t in tasks]}
    report.update(_prefixed(ev(method), "kf"))
    report.update(_prefixed(ev(teacher_predictor(method.teacher, tasks)), "teacher"))

    # assemble from the brick store on disk (no fine-tuning); it must compute the trained factor networks' outputs
    bricks = run_dir / "bricks"
    tsn_paths = [bricks / f"tsn-{t.name}.json" for t in tasks]
    net = assemble(bricks / "ckn.json", tsn_paths)
    raw = lambda x, train=False: x  # noqa: E731  (the assembled network normalises its raw inputs itself)
    report.update(_prefixed(evaluate(Predictor(net), test, tasks, raw, exp.device), "assembled"))
    diff = outputs_match(collect(method.predict, test.x, tf), collect(net.eval(), test.x, raw))
    report["assembled_max_abs_diff"] = diff
    # raw-input assembly normalises inside the network: equal up to float rounding of that one step
    report["assembled_matches_factors"] = diff <= 1e-5
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
        report.update(representation_report(method, kd, exp, tasks))
    (run_dir / "kf_report.json").write_text(json.dumps(report, indent=2))
    write_csv(run_dir / "kf_report.csv", [report_row(report)])
    return report


def representation_report(method, kd: Optional[FrozenNetwork], exp, tasks) -> Dict[str, float]:
    """The same measurements for every representation: KF task codes (the TSN means, concatenated), the KF CKN
    features, the KD student's features, the teacher's features, and randomly initialised CKN / KD-student
    networks. ``rep/<name>/<metric>``: MIG, DCI, SAP against the task latents; ``transfer/<name>/<latent>``:
    validated linear probe of each latent that was not a KF task."""
    test, train, tf = exp.data.test, exp.data.train, exp.transform
    task_cols = [t.latent for t in tasks]
    held_out = [i for i in range(len(test.latent_names)) if i not in task_cols]
    shape = {"in_channels": train.in_channels, "image_size": train.image_size}
    seed = exp.cfg.seed
    reps: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "kf_codes": lambda x: torch.cat([tsn.encode(x)[0] for tsn in method.factors.tsns], 1),
        "kf_ckn": method.factors.ckn.features,
        "teacher": method.teacher.features,
        "random_ckn": random_network(exp.cfg.model.name, shape, seed, exp.cfg.model.kwargs).features,
    }
    if kd is not None:
        reps["kd"] = kd.features
        reps["random_kd"] = random_network(kd.card, shape, seed).features
    out: Dict[str, float] = {}
    for name, fn in reps.items():
        ftr, fte = collect(fn, train.x, tf), collect(fn, test.x, tf)
        metrics = representation_metrics(ftr, train.latents[:, task_cols], fte, test.latents[:, task_cols])
        out.update(_prefixed(metrics, f"rep/{name}"))
        for col in held_out:
            out[f"transfer/{name}/{test.latent_names[col]}"] = linear_probe(ftr, train.latents[:, col], fte, test.latents[:, col], seed=seed)
    return out


def report_row(report: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in report.items() if not isinstance(v, (list, dict))}


def assembled_report(net, data: DataSplits, transform) -> Dict[str, float]:
    """Accuracy of an assembled network fed raw test inputs, and of its teacher fed the same inputs through its own
    pipeline (normalisation), on ``data``: the splits its CKN was trained on (``net.manifests[0]["provenance"]["data"]``),
    with that run's input ``transform``."""
    prov = net.manifests[0]["provenance"]
    test = data.test
    cpu = torch.device("cpu")
    if net.is_class_union:
        test = test.subset(torch.isin(test.y, torch.tensor(net.classes)).nonzero().squeeze(1))
    raw = lambda x, train=False: x  # noqa: E731  (the assembled network normalises its raw inputs itself)
    out = {f"assembled/{k}": v for k, v in evaluate(Predictor(net), test, net.tasks, raw, cpu).items()}
    teacher = load_frozen(prov["teacher"], {"mean": transform.mean, "std": transform.std} if transform.mean else None)
    if net.is_class_union:  # the teacher restricted to the same classes
        cls = torch.tensor(net.classes)
        full = teacher_predictor(teacher, build_tasks(None, data.train))

        def restricted(x):
            s = full.predict(x)
            masked = torch.full_like(s, float("-inf"))
            masked[:, cls] = s[:, cls]
            return masked

        out["teacher/acc"] = evaluate(Predictor(restricted), test, net.tasks, transform, cpu)["acc"]
    else:
        out.update({f"teacher/{k}": v for k, v in evaluate(teacher_predictor(teacher, net.tasks), test, net.tasks, transform, cpu).items()})
    return out

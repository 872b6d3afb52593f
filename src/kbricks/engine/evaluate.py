"""Evaluate finished runs: rebuild the experiment from a run directory's config and score a saved checkpoint (a
method may provide its own report, e.g. KF), and score an assembled network against its teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

from ..config import DataConfig
from ..core.checkpoint import load_checkpoint, load_state_into
from ..core.metrics import evaluate
from ..data import build_tasks
from ..errors import KbricksError
from .experiment import build_experiment, build_transform, load_config, load_data


def load_run(run_dir: Path, checkpoint: str = "last"):
    """The experiment of a run directory with the weights of ``ckpt/<checkpoint>.pt`` loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise KbricksError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.is_continual:
        raise KbricksError(f"{run_dir} is a continual run: its results are in results.json and accuracy_matrix.csv")
    exp = build_experiment(cfg)
    state = load_checkpoint(run_dir / "ckpt" / f"{checkpoint}.pt")
    load_state_into(exp.method, state["model"], "method")
    return exp, state


def evaluate_run(run_dir: Path, checkpoint: str = "last", baseline=None) -> Dict[str, Any]:
    run_dir = Path(run_dir)
    exp, state = load_run(run_dir, checkpoint)
    report = exp.method.report(exp, run_dir, Path(baseline) if baseline else None)
    if report is not None:
        return report
    metrics = evaluate(exp.method, exp.data.test, exp.tasks, exp.transform, exp.device, exp.cfg.train.eval_batch_size)
    result = {"run_dir": str(run_dir), "checkpoint": checkpoint, "epoch": state.get("epoch"), **{f"test/{k}": v for k, v in metrics.items()}}
    (run_dir / f"eval_{checkpoint}.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_assembled(net) -> Dict[str, float]:
    """Accuracy of an assembled network fed raw test inputs, and of its teacher fed the same inputs through its own
    pipeline (normalisation), on the test split its CKN was trained on."""
    from ..methods.kf.report import Predictor, teacher_predictor
    from ..models.frozen import load_frozen

    prov = net.manifests[0]["provenance"]
    data_cfg = DataConfig.model_validate(prov["data"])
    data = load_data(data_cfg)
    transform = build_transform(data_cfg, data.train)
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

"""ContinualRun.predict(x): task-free prediction (the task inferred by SupSup's rules or ImpressLearn's re-fit)."""

import pytest
import torch

from kbricks import ContinualRun, TaskFreePrediction, build_config
from kbricks.core.rundir import RunDirectory
from kbricks.engine.continual import ContinualTrainer
from kbricks.engine.experiment import build_experiment
from kbricks.errors import ConfigError


def tiny(method, tasks=3, **method_over):
    cfg = {"name": method, "data": {"name": "digits", "scenario": {"name": "permuted", "num_tasks": tasks}},
           "model": {"name": "masked_mlp", "kwargs": {"hidden": [64, 64]}} if method != "finetune" else {"name": "mlp", "kwargs": {"hidden": [64]}},
           "method": {"name": method, **method_over},
           "optim": {"name": "adam", "lr": 0.02, "weight_decay": 0.0, "schedule": "constant"},
           "train": {"epochs": 4, "batch_size": 64, "progress": "off", "plots": False}, "inference": None}
    return build_config(cfg)


def trained(method, path, **method_over) -> ContinualRun:
    exp = build_experiment(tiny(method, **method_over))
    summary = ContinualTrainer(exp, RunDirectory.open(path, "runs", "x", 0, resume=False)).fit()
    return ContinualRun(path, summary, exp.method, exp.method, exp.transform, exp.device), exp


@pytest.fixture(scope="module")
def supsup(tmp_path_factory):
    return trained("supsup", tmp_path_factory.mktemp("predict") / "s", density=0.5)


@pytest.mark.parametrize("infer", ["one_shot", "binary"])
def test_predict_infers_each_task_and_labels_as_predict_task(supsup, infer):
    run, exp = supsup
    for t, data in enumerate(exp.scenario):
        x = data.test.x[:32]
        out = run.predict(x, infer=infer)
        assert isinstance(out, TaskFreePrediction) and out.labels.shape == (32,) and out.tasks.tolist() == [t] * 32
        assert torch.equal(out.labels, run.predict_task(x, t).argmax(1))
        assert torch.equal(out.logits, run.predict_task(x, t))
        labels, tasks = out  # unpacks as a pair
        assert torch.equal(labels, out.labels) and torch.equal(tasks, out.tasks)


def test_predict_groups_infer_one_task_per_group(supsup):
    run, exp = supsup
    x = torch.cat([exp.scenario[2].test.x[:16], exp.scenario[0].test.x[:16], exp.scenario[1].test.x[:8]])
    out = run.predict(x, group=16)
    assert out.tasks.tolist() == [2] * 16 + [0] * 16 + [1] * 8  # the last group is shorter
    assert torch.equal(out.labels[16:32], run.predict_task(x[16:32], 0).argmax(1))
    assert run.predict(x[:0]).labels.shape == (0,)


def test_predict_refuses_what_it_cannot_do(supsup, tmp_path):
    run, _ = supsup
    x = torch.zeros(2, 64)
    with pytest.raises(ConfigError, match="infer='oracle' is not a task-inference rule; use one of one_shot, binary"):
        run.predict(x, infer="oracle")
    with pytest.raises(ConfigError, match="SupSup stores one mask per task"):
        run.predict(x, infer="refit_uniform")
    with pytest.raises(ConfigError, match="group=0 must be >= 1"):
        run.predict(x, group=0)
    dense, _ = trained("finetune", tmp_path / "f")
    with pytest.raises(ConfigError, match=r"cannot infer the task .*use predict_task\(x, task\)") as e:
        dense.predict(x)
    assert "\n" not in str(e.value)


def test_predict_refits_impresslearn_coefficients(tmp_path):
    run, exp = trained("impresslearn", tmp_path / "i", density=0.5, impressions=2, alpha_epochs=2)
    x = exp.scenario[0].test.x[:16]
    out = run.predict(x, infer="refit_nearest")
    assert out.labels.shape == (16,) and 0 <= int(out.tasks[0]) < 3 and len(set(out.tasks.tolist())) == 1
    assert torch.equal(out.labels, out.logits[:, :10].argmax(1))

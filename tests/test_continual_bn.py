"""Per-task BatchNorm statistics in the continual task loop (issue 12.1): each task's slot is estimated by its own
training and touched by nothing else; statistics shared across tasks make earlier tasks forget."""

import pytest
import torch

from kbricks import build_config
from kbricks.core.hooks import Hook
from kbricks.core.rundir import RunDirectory
from kbricks.engine.continual import ContinualTrainer
from kbricks.engine.experiment import build_experiment
from kbricks.models.masked import ScoreMasks
from kbricks.models.supermask import supermask


def split_conv(method="supsup", **over):
    """supsup_splitdigits_conv.yaml at a unit-test budget."""
    data = {"name": "bn", "data": {"name": "digits", "scenario": {"name": "split", "num_tasks": 5}},
            "model": {"name": "masked_convnet", "kwargs": {"widths": [8, 16]}},
            "method": {"name": method, "density": 0.5},
            "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "schedule": "constant"},
            "train": {"epochs": 4, "batch_size": 64, "progress": "off", "plots": False}}
    if method == "impresslearn":
        data["method"].update(impressions=2, alpha_epochs=2)
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


def bn_state(strategy):
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in strategy.net.batchnorms()]


def changed_slots(before, after):
    """Slots whose statistics differ between two snapshots (a slot that did not exist before counts as changed
    only if it moved away from mean 0 / var 1)."""
    out = set()
    for (m0, v0), (m1, v1) in zip(before, after):
        for slot in range(m1.shape[0]):
            old_m = m0[slot] if slot < m0.shape[0] else torch.zeros_like(m1[slot])
            old_v = v0[slot] if slot < v0.shape[0] else torch.ones_like(v1[slot])
            if not (torch.equal(old_m, m1[slot]) and torch.equal(old_v, v1[slot])):
                out.add(slot)
    return out


@pytest.mark.parametrize("method", ["supsup", "impresslearn"])
def test_every_task_bn_slot_is_updated_by_its_own_training_and_nothing_else(method, tmp_path):
    """Snapshots around every stage (ImpressLearn: impressions, then the seed tasks' alphas, then one alpha per task)
    and after each task's evaluations: a stage on task j's data changes slot j and no other; nothing else (choosing
    starts, evaluating every seen task) changes any slot."""
    exp = build_experiment(split_conv(method))
    s = exp.method
    events = []  # (what, task of the stage or None, snapshot)
    begin, end = s.begin_stage, s.end_stage

    def begin_stage(stage):
        params = begin(stage)
        events.append(("begin", stage.task, bn_state(s)))
        return params

    def end_stage(stage):
        assert s.training  # the Loop switched the strategy to train mode for this stage
        end(stage)
        events.append(("end", stage.task, bn_state(s)))

    s.begin_stage, s.end_stage = begin_stage, end_stage

    class AfterEvaluation(Hook):
        def on_task_end(self, trainer, task, metrics):
            events.append(("evaluated", None, bn_state(s)))

    result = ContinualTrainer(exp, RunDirectory.open(tmp_path / "run", "runs", "x", 0, resume=False), [AfterEvaluation()]).fit()
    if method == "supsup":  # per-task statistics: nothing is forgotten, to the bit
        assert result["forgetting"] == 0.0 and result["bwt"] == 0.0
        assert result["bn_bytes_per_task"] == 4 * 2 * (8 + 16) and result["bytes_per_task"] == result["bytes_per_mask"] + 4 * 2 * (8 + 16)
    previous = [(torch.zeros(0, bn.channels), torch.ones(0, bn.channels)) for bn in s.net.batchnorms()]  # no slot yet
    trained = set()
    for what, task, snap in events:
        moved = changed_slots(previous, snap)
        if what == "end":
            assert moved == {task}, f"a stage on task {task} changed slots {sorted(moved)}"
            trained.add(task)
        else:
            assert moved == set(), f"{what} changed slots {sorted(moved)}"
        previous = snap
    assert trained == set(range(len(exp.scenario)))
    assert [bn.running_mean.shape[0] for bn in s.net.batchnorms()] == [len(exp.scenario)] * 2


def test_shared_batchnorm_statistics_forget(tmp_path):
    """The failure mode of SupSup issue #11: with one set of BN statistics for every task, learning later tasks
    changes the earlier ones (per-task statistics keep them exactly: the test above)."""
    from kbricks.engine.run import run_continual

    shared = run_continual(split_conv(**{"method.batchnorm": "shared"}), tmp_path / "shared")
    assert shared["forgetting"] > 0.02 and shared["bn_bytes_per_task"] == 0


def test_batch_statistics_and_calibration_contexts():
    net = supermask(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4)), seed=0)
    scores = net.new_scores(torch.Generator().manual_seed(0))
    bn = net.batchnorms()[0]
    xs = [torch.randn(8, 1, 6, 6) + i for i in range(3)]
    src = ScoreMasks(scores, 0.5)
    with net.using(src, task=1):  # slot 1 exists from here on
        net.train()
        net(xs[0])
    before = (bn.running_mean.clone(), bn.running_var.clone())
    with net.batch_statistics(), net.using(src, task=1):
        net(xs[1])
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    with net.calibrating(1), net.using(src, task=1):  # slot 1 becomes the plain average over the batches
        feats = []
        for x in xs:
            net(x)
            feats.append(torch.nn.functional.conv2d(x, net.masked_layers()[0].effective_weight()))
    means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean[1], means, atol=1e-5)
    assert torch.equal(bn.running_mean[0], before[0][0])  # the other slot is untouched
    assert bn.mode == "running"

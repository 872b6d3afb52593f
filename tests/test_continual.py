import json
import math

import pytest
import torch
from torch import nn

from kbricks import build_config
from kbricks.continual.inference import infer_task
from kbricks.continual.metrics import cl_metrics
from kbricks.core.hooks import Hook, RunState, read_jsonl
from kbricks.data import load_dataset
from kbricks.data.scenarios import build_scenario, rotate
from kbricks.engine.card import CARD_KEYS
from kbricks.engine.continual import ContinualTrainer
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_continual
from kbricks.errors import CheckpointError, ConfigError
from kbricks.models.masked import (
    Combination,
    FixedMasks,
    MaskBank,
    MaskedConv2d,
    ScoreMasks,
    StoredMask,
    pack_bits,
    topk_mask,
    unpack_bits,
)
from kbricks.models.supermask import supermask


def test_topk_sparsity_is_exact():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 23, generator=g)
    for density in (0.01, 0.1, 0.5, 0.77, 1.0):
        m = topk_mask(s, density)
        assert m.sum().item() == math.ceil(density * s.numel())
        kept = s.abs()[m.bool()]
        dropped = s.abs()[~m.bool()]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()


def test_straight_through_gradient_reaches_scores_not_weights():
    net = supermask(nn.Sequential(nn.Linear(6, 4)), density=0.5, seed=0)
    layer = net.masked_layers()[0]
    (scores,) = net.new_scores(torch.Generator().manual_seed(1))
    x = torch.randn(5, 6)
    with net.using(ScoreMasks([scores], 0.5)):
        out = net(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert list(net.parameters()) == [] and not layer.weight.requires_grad  # weights are buffers
    # d/ds of W*topk(|s|) with a straight-through top-k is (dL/dW_eff * W) * sign(s)
    grad_w_eff = upstream.t() @ x
    assert torch.allclose(scores.grad, grad_w_eff * layer.weight * scores.detach().sign(), atol=1e-6)


def test_signed_constant_weights():
    conv = MaskedConv2d(3, 8, generator=torch.Generator().manual_seed(0))
    std = math.sqrt(2.0 / (3 * 9))
    assert torch.allclose(conv.weight.abs(), torch.full_like(conv.weight, std))
    assert 0.3 < (conv.weight > 0).float().mean() < 0.7


def test_mask_source_is_scoped_to_the_block():
    net = supermask(nn.Sequential(nn.Linear(4, 3)), seed=0)
    net.store([torch.ones(3, 4, dtype=torch.bool)])
    with net.using(StoredMask(0)):
        net(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="outside `with net.using"):
        net(torch.randn(2, 4))


def test_packed_bank_round_trip_and_growth():
    g = torch.Generator().manual_seed(0)
    bank = MaskBank((13, 7))  # 91 weights: not a multiple of 8
    masks = [torch.rand(13, 7, generator=g) < 0.5 for _ in range(9)]  # grows past the initial capacity twice
    for i, m in enumerate(masks):
        assert bank.append(m) == i
    assert bank.packed().shape == (9, 12) and bank.packed().dtype == torch.uint8
    assert all(torch.equal(bank.get(i).bool(), m) for i, m in enumerate(masks))
    assert torch.equal(bank.as_float(), torch.stack([m.flatten().float() for m in masks]))
    assert torch.equal(unpack_bits(pack_bits(masks[3]), 91).view(13, 7), masks[3])
    restored = MaskBank((13, 7))
    restored.set_extra_state(bank.get_extra_state())
    assert len(restored) == 9 and torch.equal(restored.get(8).bool(), masks[8])


def test_combination_equals_weighted_sum_of_masks():
    net = supermask(nn.Sequential(nn.Flatten(), nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False)), seed=0)
    for i in range(3):
        net.store_scores(net.new_scores(torch.Generator().manual_seed(i)))
    alpha = torch.tensor([[0.2, -0.5, 1.1], [0.3, 0.3, 0.4]])
    x = torch.randn(7, 16)
    with net.using(Combination(alpha)):
        a = net(x)
    masks = [sum(alpha[i, j] * layer.bank.get(j) for j in range(3)) for i, layer in enumerate(net.masked_layers())]
    with net.using(FixedMasks(masks)):
        b = net(x)
    assert torch.allclose(a, b, atol=1e-6)
    with net.using(Combination(torch.tensor([[0.0, 1.0, 0.0]] * 2))):  # one-hot = the stored mask itself
        c = net(x)
    with net.using(StoredMask(1)):
        d = net(x)
    assert torch.allclose(c, d, atol=1e-6)


def test_supermask_of_a_user_mlp_equals_the_builtin_masked_mlp():
    from kbricks.models import create_model

    class UserMLP(nn.Module):  # another class, layout and forward, with biases: the same layers in the same order
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))

    builtin = supermask(create_model("masked_mlp", num_classes=10, in_channels=1, image_size=8, hidden=[32, 16]), 0.5, seed=3)
    user = supermask(UserMLP(), 0.5, seed=3)
    for a, b in zip(builtin.masked_layers(), user.masked_layers()):
        assert torch.equal(a.weight, b.weight)
    scores = builtin.new_scores(torch.Generator().manual_seed(0))
    x = torch.rand(5, 1, 8, 8)
    with builtin.using(ScoreMasks(scores, 0.5)), user.using(ScoreMasks(scores, 0.5)):  # biases are dropped, as in SupSup
        assert torch.allclose(builtin(x), user(x), atol=1e-6)


def test_cl_metrics_hand_values():
    R = [[0.9, None, None], [0.8, 0.95, None], [0.7, 0.9, 0.85]]
    m = cl_metrics([[v if v is not None else 0.0 for v in row] for row in R])
    assert m["avg_acc"] == pytest.approx((0.7 + 0.9 + 0.85) / 3)
    assert m["bwt"] == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)
    assert cl_metrics([[1.0, 0], [1.0, 1.0]])["forgetting"] == 0.0
    # an empty row (a block of tasks learned as a unit): each task counts from the first row that evaluates it
    m = cl_metrics([[None, None, None], [0.9, 0.8, None], [0.85, 0.8, 0.7]])
    assert m["bwt"] == pytest.approx(((0.85 - 0.9) + 0.0) / 2) and m["forgetting"] == pytest.approx((0.05 + 0.0) / 2)
    assert m["avg_incremental_acc"] == pytest.approx(((0.9 + 0.8) / 2 + (0.85 + 0.8 + 0.7) / 3) / 2)
    with pytest.raises(ValueError, match="last row"):
        cl_metrics([[0.9, None], [None, None]])


def test_rotation_and_scenarios():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 2] = 1.0
    assert torch.equal(rotate(x, 0), x)
    r = rotate(x, 90)
    assert torch.allclose(r[0, 0], torch.rot90(x[0, 0], k=-1), atol=1e-5) or torch.allclose(r[0, 0], torch.rot90(x[0, 0], k=1), atol=1e-5)
    digits = load_dataset("digits")
    tasks = build_scenario("permuted", digits, num_tasks=3)
    assert [t.name for t in tasks] == ["perm0", "perm1", "perm2"]
    # same images, permuted pixels: sorted pixel values per image are unchanged
    assert torch.equal(tasks[1].train.x.flatten(1).sort(1).values, tasks[0].train.x.flatten(1).sort(1).values)
    assert not torch.equal(tasks[1].train.x, tasks[0].train.x)
    split = build_scenario("split", digits, num_tasks=5)
    assert [t.num_classes for t in split] == [2] * 5 and set(split[3].train.y.tolist()) == {0, 1}


def tiny(method="supsup", tasks=3, **over):
    data = {"name": method, "data": {"name": "digits", "scenario": {"name": "permuted", "num_tasks": tasks}},
            "model": {"name": "masked_mlp", "kwargs": {"hidden": [64, 64]}},
            "method": {"name": method, "density": 0.5},
            "optim": {"name": "adam", "lr": 0.02, "weight_decay": 0.0, "schedule": "constant"},
            "train": {"epochs": 6, "batch_size": 64, "progress": "off", "plots": False},
            "inference": {"images": [16], "trials_per_task": 5, "methods": ["one_shot", "binary"]}}
    if method == "impresslearn":
        data["method"].update(impressions=3, alpha_epochs=2, alpha_optim={"name": "adam", "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"})
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("method", ["supsup", "impresslearn"])
def test_no_forgetting_bit_for_bit_and_frozen_backbone(method, tmp_path):

    cfg = tiny(method, **({"method.impressions": 2} if method == "impresslearn" else {}))
    exp = build_experiment(cfg)
    strategy = exp.method
    weights = {n: b.clone() for n, b in strategy.named_buffers() if n.endswith("weight")}
    logits_after = {}

    final_from = getattr(strategy, "seed_count", 1)  # ImpressLearn's seed tasks get their alpha when the seed phase ends

    class Check(Hook):
        def on_task_end(self, state, task, metrics):
            # the same RunState as plain runs': the task just learned, its last stage's loop, the rows so far
            assert isinstance(state, RunState) and state.continual and state.method is strategy
            assert state.task == task - 1 and state.num_tasks == 3 and state.metrics[-1] is metrics and state.loop is not None
            strategy.eval()
            for j in range(task):
                x = exp.transform(exp.scenario[j].test.x, train=False)
                out = strategy.predict_task(x, j)
                if j in logits_after and task > final_from:
                    assert torch.equal(out, logits_after[j]), f"task {j} changed after learning task {task - 1}"
                logits_after[j] = out

    from kbricks.core.rundir import RunDirectory

    run = RunDirectory.open(tmp_path / "r", "runs", "x", 0, resume=False)
    ContinualTrainer(exp, run, [Check()]).fit()
    for n, b in strategy.named_buffers():
        if n.endswith("weight"):
            assert torch.equal(b, weights[n]), f"backbone weight {n} changed"
    acc = [(logits_after[j].argmax(1) == exp.scenario[j].test.y).float().mean().item() for j in range(3)]
    # 10 classes: chance is 0.1. ImpressLearn's task 2 is not an impression, and permutations are unrelated tasks:
    # two impressions do not carry over to it (the CL study measures how far they do)
    assert min(acc[:2] if method == "impresslearn" else acc) > 0.5


def test_run_metrics_params_and_task_inference(tmp_path):
    r = run_continual(tiny(), tmp_path / "s")
    assert r["forgetting"] == 0.0 and r["bwt"] == 0.0
    R = r["accuracy_matrix"]
    for j in range(3):
        assert len({R[i][j] for i in range(j, 3)}) == 1  # column constant
    assert r["params_per_task"] == 64 * 64 + 64 * 64 + 64 * 10 == r["weights_per_mask"]
    assert r["bytes_per_task"] == (64 * 64 + 64 * 64 + 64 * 10) / 8  # packed bits, no BatchNorm
    assert r["task_inference/one_shot/16img"] >= 0.8 and r["task_inference/binary/16img"] >= 0.8  # chance: 1/3
    for f in ("accuracy_matrix.csv", "metrics.jsonl", "summary.csv", "results.json", "ckpt/last.pt", "config.yaml", "env.json", "model.json", "model.safetensors"):
        assert (tmp_path / "s" / f).exists(), f
    # one card schema for plain and continual runs (tests/test_trainer.py checks a plain run's against the same keys)
    card = json.loads((tmp_path / "s" / "model.json").read_text())
    assert tuple(card) == CARD_KEYS and card["network"] == "supermask" and card["scenario"]["name"] == "permuted"
    assert card["num_classes"] == 10 and card["classes"] is None and [t["num_classes"] for t in card["tasks"]] == [10, 10, 10]
    assert card["metrics"]["forgetting"] == 0.0 and "accuracy_matrix" not in card["metrics"]
    rows = read_jsonl(tmp_path / "s" / "metrics.jsonl")
    assert [r["task"] for r in rows if "acc_current" in r] == [1, 2, 3]
    assert sum(1 for r in rows if r.get("stage") == "mask") == 3 * 6  # one row per epoch per task, as in `train`
    il = run_continual(tiny("impresslearn", **{"method.impressions": 2}), tmp_path / "i")
    assert il["params_per_task"] == 3 * 2 and il["bytes_per_task"] == 4 * 6 and il["stored_masks"] == 2
    # the seed tasks 1-2 are one block (their alphas span both impressions): nothing is evaluated inside it, and
    # no column changes afterwards
    R = il["accuracy_matrix"]
    assert R[0] == [None, None, None] and il["forgetting"] == 0.0 and il["bwt"] == 0.0
    assert all(len({R[i][j] for i in range(1, 3)}) == 1 for j in range(2))
    assert il["alpha_fit"]["task"] == [0, 1, 2]


def test_one_shot_inference_picks_the_right_task(tmp_path):
    cfg = tiny(inference="null")
    exp = build_experiment(cfg)
    from kbricks.core.rundir import RunDirectory

    ContinualTrainer(exp, RunDirectory.open(tmp_path / "r", "runs", "x", 0, resume=False)).fit()
    for t in range(3):
        x = exp.transform(exp.scenario[t].test.x[:32], train=False)
        for method in ("one_shot", "binary"):
            assert infer_task(exp.method, x, method) == t


def test_resume_after_a_task_gives_the_same_run(tmp_path):
    short = {"inference": "null", "train.epochs": 2}
    full = run_continual(tiny(**short), tmp_path / "full")
    assert run_continual(tiny(**short), tmp_path / "part", stop_after=1)["stopped_after"] == 1
    with pytest.raises(ConfigError, match="--resume"):
        run_continual(tiny(**short), tmp_path / "part")
    resumed = run_continual(tiny(**short), tmp_path / "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "seconds")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "part/metrics.jsonl")) == strip(read_jsonl(tmp_path / "full/metrics.jsonl"))
    with pytest.raises(CheckpointError, match="different"):
        run_continual(tiny(seed=5, **short), tmp_path / "part", resume=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="method.impresions: unknown key"):
        tiny("impresslearn", **{"method.impresions": 3})
    with pytest.raises(ConfigError, match="unknown scenario 'shuffled'"):
        tiny(**{"data.scenario.name": "shuffled"})
    with pytest.raises(ConfigError, match="unknown argument"):
        tiny(**{"model.kwargs.depth": 3})
    with pytest.raises(ConfigError, match="continual strategy: set data.scenario"):
        build_config({"data": {"name": "digits"}, "model": {"name": "masked_mlp"}, "method": {"name": "supsup"}})
    with pytest.raises(ConfigError, match="not a continual strategy"):
        build_config({"data": {"name": "digits", "scenario": {"name": "split"}}, "model": {"name": "mlp"}, "method": {"name": "supervised"}})


def test_refused_resume_writes_nothing_and_an_lr_change_is_announced(tmp_path, capsys):
    short = {"inference": "null", "train.epochs": 1}
    run_continual(tiny(**short), tmp_path / "part", stop_after=1)
    before = (tmp_path / "part" / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="different"):
        run_continual(tiny(seed=5, **short), tmp_path / "part", resume=True)
    assert (tmp_path / "part" / "config.yaml").read_text() == before  # checked before config.yaml is rewritten
    capsys.readouterr()
    lr = tiny(**short).optim.lr
    run_continual(tiny(**short, **{"optim.lr": lr / 2}), tmp_path / "part", resume=True)
    assert f"optim.lr {lr} -> {lr / 2} (applies to the tasks still to learn, from task 2)" in capsys.readouterr().err

import math

import pytest
import torch

from kbricks.continual.inference import candidate_masks, infer_task
from kbricks.continual.metrics import cl_metrics
from kbricks.continual.runner import ContinualConfig, build, predict_task, run_continual
from kbricks.continual.scenarios import build_scenario, rotate
from kbricks.errors import ConfigError
from kbricks.models.masked import MaskedConv2d, MaskedLinear, MaskedMLP, topk_mask


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
    layer = MaskedLinear(6, 4, torch.Generator().manual_seed(0))
    scores = layer.new_scores(torch.Generator().manual_seed(1))
    x = torch.randn(5, 6)
    out = layer(x, 0.5)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert [n for n, _ in layer.named_parameters()] == ["scores"] and not layer.weight.requires_grad  # weights are buffers
    # d/ds of W*topk(|s|) with a straight-through top-k is (dL/dW_eff * W) * sign(s)
    grad_w_eff = upstream.t() @ x
    assert torch.allclose(scores.grad, grad_w_eff * layer.weight * scores.detach().sign(), atol=1e-6)


def test_signed_constant_weights():
    conv = MaskedConv2d(3, 8, generator=torch.Generator().manual_seed(0))
    std = math.sqrt(2.0 / (3 * 9))
    assert torch.allclose(conv.weight.abs(), torch.full_like(conv.weight, std))
    assert 0.3 < (conv.weight > 0).float().mean() < 0.7


def test_cached_forward_equals_combination_forward():
    net = MaskedMLP(16, 4, (8,), density=0.5, seed=0)
    for i in range(3):
        net.use_scores(torch.Generator().manual_seed(i))
        net.store_scores_as_masks()
    alphas = [torch.tensor([0.2, -0.5, 1.1])] * 2
    x = torch.randn(7, 16)
    net.use_alpha(alphas)
    a = net(x)
    net.use_cached(alphas)
    b = net(x)
    assert torch.allclose(a, b, atol=1e-6)
    net.use_cached([torch.tensor([0.0, 1.0, 0.0])] * 2)  # one-hot = plain mask of slot 1
    w = net.layers[0].weight * net.layers[0].masks[1]
    assert torch.equal(net.layers[0].cached, w)


def test_cl_metrics_hand_values():
    R = [[0.9, None, None], [0.8, 0.95, None], [0.7, 0.9, 0.85]]
    m = cl_metrics([[v if v is not None else 0.0 for v in row] for row in R])
    assert m["avg_acc"] == pytest.approx((0.7 + 0.9 + 0.85) / 3)
    assert m["bwt"] == pytest.approx(((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.9)) / 2)
    assert cl_metrics([[1.0, 0], [1.0, 1.0]])["forgetting"] == 0.0


def test_rotation_and_scenarios():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 2] = 1.0
    assert torch.equal(rotate(x, 0), x)
    r = rotate(x, 90)
    assert torch.allclose(r[0, 0], torch.rot90(x[0, 0], k=-1), atol=1e-5) or torch.allclose(r[0, 0], torch.rot90(x[0, 0], k=1), atol=1e-5)
    tasks = build_scenario("permuted", num_tasks=3, dataset="digits")
    assert [t.name for t in tasks] == ["perm0", "perm1", "perm2"]
    # same images, permuted pixels: sorted pixel values per image are unchanged
    assert torch.equal(tasks[1].train.x.flatten(1).sort(1).values, tasks[0].train.x.flatten(1).sort(1).values)
    assert not torch.equal(tasks[1].train.x, tasks[0].train.x)
    split = build_scenario("split", num_tasks=5, dataset="digits")
    assert [t.num_classes for t in split] == [2] * 5 and set(split[3].train.y.tolist()) == {0, 1}


def tiny(method="supsup", params=None, tasks=3, **over):
    data = {"name": method, "scenario": {"name": "permuted", "num_tasks": tasks, "dataset": "digits"},
            "model": {"name": "masked_mlp", "kwargs": {"hidden": [64, 64], "density": 0.5}},
            "method": {"name": method, "params": params or {}},
            "train": {"steps_per_task": 100, "batch_size": 64, "lr": 0.02, "alpha_lr": 0.05},
            "inference": {"images": [16], "trials_per_task": 5, "methods": ["one_shot", "binary"]}, "plots": False}
    data.update(over)
    return ContinualConfig.model_validate(data)


@pytest.mark.parametrize("method,params", [("supsup", {}), ("impresslearn", {"impressions": 3})])
def test_no_forgetting_bit_for_bit_and_frozen_backbone(method, params, tmp_path):
    cfg = tiny(method, params)
    tasks, net, m = build(cfg)
    weights = {n: b.clone() for n, b in net.named_buffers() if n.endswith("weight")}
    from kbricks.continual.runner import make_fit

    logits_after = {}
    for t in range(3):
        m.learn_task(t, make_fit(tasks[t], 64, 0, t), 0.02, 100, alpha_lr=0.05)
        for j in range(t + 1):
            out = predict_task(net, m, j, tasks[j].test.x, 1000)
            if j in logits_after:
                assert torch.equal(out, logits_after[j]), f"task {j} changed after learning task {t}"
            logits_after[j] = out
    for n, b in net.named_buffers():
        if n.endswith("weight"):
            assert torch.equal(b, weights[n]), f"backbone weight {n} changed"
    acc = [(logits_after[j].argmax(1) == tasks[j].test.y).float().mean().item() for j in range(3)]
    assert min(acc) > 0.5  # 10 classes: chance is 0.1


def test_run_metrics_params_and_task_inference(tmp_path):
    r = run_continual(tiny(), tmp_path / "s")
    assert r["forgetting"] == 0.0 and r["bwt"] == 0.0
    R = r["accuracy_matrix"]
    for j in range(3):
        assert len({R[i][j] for i in range(j, 3)}) == 1  # column constant
    assert r["params_per_task"] == 64 * 64 + 64 * 64 + 64 * 10 == r["weights_per_mask"]
    assert r["task_inference/one_shot/16img"] >= 0.8 and r["task_inference/binary/16img"] >= 0.8  # chance: 1/3
    for f in ("accuracy_matrix.csv", "metrics.jsonl", "results.json", "ckpt/last.pt", "config.yaml"):
        assert (tmp_path / "s" / f).exists()
    il = run_continual(tiny("impresslearn", {"impressions": 2}), tmp_path / "i")
    assert il["params_per_task"] == 3 * 2 and il["bytes_per_task"] == 4 * 6
    assert il["forgetting"] == 0.0 and il["stored_masks"] == 2


def test_one_shot_inference_picks_the_right_task():
    cfg = tiny()
    tasks, net, m = build(cfg)
    from kbricks.continual.runner import make_fit

    for t in range(3):
        m.learn_task(t, make_fit(tasks[t], 64, 0, t), 0.02, 100)
    cands = candidate_masks(net, [m.task_alphas(t) for t in range(3)])
    for t in range(3):
        for method in ("one_shot", "binary"):
            assert infer_task(net, tasks[t].test.x[:32], cands, method) == t


def test_resume_after_a_task_gives_the_same_run(tmp_path):
    full = run_continual(tiny(inference=None), tmp_path / "full")
    assert run_continual(tiny(inference=None), tmp_path / "part", stop_after=1) == {"stopped_after": 1}
    with pytest.raises(ConfigError, match="--resume"):
        run_continual(tiny(inference=None), tmp_path / "part")
    resumed = run_continual(tiny(inference=None), tmp_path / "part", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    from kbricks.errors import CheckpointError

    with pytest.raises(CheckpointError, match="different config"):
        run_continual(tiny(inference=None, seed=5), tmp_path / "part", resume=True)


def test_config_errors(tmp_path):
    import yaml

    from kbricks.continual.runner import load_continual_config

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"method": {"name": "impresslearn", "params": {"impresions": 3}}}))
    with pytest.raises(ConfigError, match="method.params.impresions: unknown key"):
        load_continual_config(p)
    p.write_text(yaml.safe_dump({"scenario": {"name": "shuffled"}}))
    with pytest.raises(ConfigError, match="unknown scenario 'shuffled'"):
        load_continual_config(p)
    p.write_text(yaml.safe_dump({"model": {"name": "masked_mlp", "kwargs": {"depth": 3}}}))
    with pytest.raises(ConfigError, match="unknown argument"):
        load_continual_config(p)

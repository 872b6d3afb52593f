"""Stored masks at scale (issue 16): evaluation of a known task independent of how many masks are stored, packed
masks on disk (1 bit per weight) and back, task inference as one forward/backward plus dot products."""

import pytest
import torch
from torch import nn

from kbricks import build_config
from kbricks.continual.inference import g_objective, mean_entropy, superposition_gradient
from kbricks.core.checkpoint import load_checkpoint, load_safetensors, load_state_into
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_continual
from kbricks.models import create_model
from kbricks.models.masked import FixedMasks, MaskBank, StoredMask
from kbricks.models.supermask import supermask


def random_masks(net, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.rand(layer.weight.shape, generator=g) < 0.5 for layer in net.masked_layers()] for _ in range(n)]


def test_known_task_output_is_bit_identical_to_a_network_holding_only_that_mask():
    body = create_model("masked_mlp", num_classes=10, in_channels=1, image_size=8, hidden=[32, 16])
    many, one = supermask(body, 0.5, seed=4), supermask(body, 0.5, seed=4)
    masks = random_masks(many, 40)
    for m in masks:
        many.store(m)
    one.store(masks[23])
    x = torch.rand(17, 1, 8, 8)
    with torch.no_grad(), many.using(StoredMask(23)):
        a = many(x)
    with torch.no_grad(), one.using(StoredMask(0)):
        b = one(x)
    assert torch.equal(a, b)


def test_bank_streams_blocks_with_the_same_results_as_the_cached_float_view(monkeypatch):
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(5, 11, generator=g) < 0.5 for _ in range(10)]
    cached, streamed = MaskBank((5, 11)), MaskBank((5, 11))
    monkeypatch.setattr(streamed, "float_cache_bytes", 0)
    monkeypatch.setattr(streamed, "block_rows", 3)
    for m in masks:
        cached.append(m)
        streamed.append(m)
    assert cached.float_cached() and not streamed.float_cached()
    w, v = torch.randn(10), torch.randn(5, 11)
    expected = sum(wi * m.float() for wi, m in zip(w, masks))
    assert torch.allclose(cached.combine(w), expected, atol=1e-5) and torch.allclose(streamed.combine(w), expected, atol=1e-5)
    dots = torch.stack([(m.float() * v).sum() for m in masks])
    assert torch.allclose(cached.dots(v), dots, atol=1e-5) and torch.allclose(streamed.dots(v), dots, atol=1e-5)
    assert torch.equal(cached.total(), torch.stack(masks).float().sum(0))


def test_superposition_gradient_is_the_gradient_with_respect_to_the_mixing_weights():
    """One forward/backward plus a dot product per stored mask == autograd through beta (SupSup's alphas)."""
    from kbricks.continual.supsup import SupSup

    net = supermask(nn.Sequential(nn.Flatten(), nn.Linear(16, 12, bias=False), nn.ReLU(), nn.Linear(12, 5, bias=False)), seed=0)
    for m in random_masks(net, 6):
        net.store(m)
    strategy = SupSup.__new__(SupSup)  # the gradient only reads the network
    nn.Module.__init__(strategy)
    strategy.net, strategy.task_classes = net, [5] * 6
    x = torch.randn(9, 16)
    for active in (list(range(6)), [1, 4, 5]):
        beta = torch.zeros(6)
        beta[active] = 1.0 / len(active)
        beta.requires_grad_(True)
        masks = [sum(beta[i] * layer.bank.get(i) for i in range(6)) for layer in net.masked_layers()]
        with net.using(FixedMasks(masks)):
            (expected,) = torch.autograd.grad(mean_entropy(net(x)), beta)
        assert torch.allclose(superposition_gradient(strategy, x, active), expected, atol=1e-6)


def test_g_objective_reads_only_the_superfluous_outputs():
    logits = torch.randn(4, 12, requires_grad=True)
    (grad,) = torch.autograd.grad(g_objective(logits, real=10), logits)
    assert torch.equal(grad[:, :10], torch.zeros(4, 10)) and (grad[:, 10:] > 0).all()
    with pytest.raises(ValueError, match="superfluous outputs"):
        g_objective(torch.randn(2, 10), real=10)


def tiny_supsup(**over):
    data = {"name": "s", "data": {"name": "digits", "scenario": {"name": "permuted", "num_tasks": 3}},
            "model": {"name": "masked_mlp", "kwargs": {"hidden": [64, 64]}},
            "method": {"name": "supsup", "density": 0.5, "outputs": 16},
            "optim": {"name": "adam", "lr": 0.02, "weight_decay": 0.0, "schedule": "constant"},
            "train": {"epochs": 5, "batch_size": 64, "progress": "off", "plots": False},
            "inference": {"images": [16], "trials_per_task": 4, "methods": ["one_shot"], "objective": "g"}}
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


def test_packed_masks_on_disk_round_trip_and_per_task_bytes_equal_the_bytes_stored(tmp_path):
    cfg = tiny_supsup()
    r = run_continual(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "ckpt" / "last.pt")["model"]
    banks = {k: v for k, v in state.items() if k.endswith("bank._extra_state")}
    weights = 64 * 64 + 64 * 64 + 64 * 16  # superfluous-neuron head: 16 outputs for 10 classes
    assert r["weights_per_mask"] == weights
    for v in banks.values():
        assert v["packed"].dtype == torch.uint8 and v["packed"].shape[0] == 3  # one row per task, 8 weights a byte
    stored = sum(v["packed"].numel() for v in banks.values())
    assert stored == 3 * r["bytes_per_task"] == 3 * (64 * 64 + 64 * 64 + 64 * 16) // 8
    shipped = load_safetensors(tmp_path / "run" / "model.safetensors")
    assert sum(t.numel() * t.element_size() for k, t in shipped.items() if k.endswith(".packed")) == 3 * r["bytes_per_task"]
    # loading the packed masks into a fresh strategy gives the same masks and the same predictions
    fresh = build_experiment(cfg)
    load_state_into(fresh.method, state, "strategy")
    exp = build_experiment(cfg)
    x = exp.transform(exp.scenario[2].test.x[:50], train=False)
    fresh.method.eval()
    direct = []
    for t in range(3):
        with torch.no_grad(), fresh.method.net.using(StoredMask(t)):
            direct.append(fresh.method.net(x))
    assert not torch.equal(direct[0], direct[2])
    assert torch.equal(fresh.method.predict_task(x, 2), direct[2])
    assert r["task_inference/one_shot/16img"] >= 0.75 and "task_inference/one_shot/first_image" in r

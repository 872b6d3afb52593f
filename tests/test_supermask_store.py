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
from kbricks.models.masked import FixedMasks, MaskBank, StoredMask, pack_bits, unpack_bits
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


@pytest.mark.parametrize("block_elements", [1, 14, 2**20])  # one row per block, two rows, the whole bank
def test_packed_bank_reads_give_the_float_formulas(monkeypatch, block_elements):
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(5, 11, generator=g) < 0.5 for _ in range(10)]  # 55 weights: a padded last byte
    bank = MaskBank((5, 11))
    monkeypatch.setattr(bank, "block_elements", block_elements)
    for m in masks:
        bank.append(m)
    as_float = torch.stack([m.flatten().float() for m in masks])
    w, v = torch.randn(10), torch.randn(5, 11)
    assert torch.allclose(bank.combine(w), (w @ as_float).view(5, 11), atol=1e-5)
    assert torch.allclose(bank.combine(w[:4]), (w[:4] @ as_float[:4]).view(5, 11), atol=1e-5)  # the first 4 only
    assert torch.allclose(bank.dots(v), as_float @ v.flatten(), atol=1e-5)
    assert torch.allclose(bank.dots(v, rows=3), as_float[:3] @ v.flatten(), atol=1e-5)
    assert torch.equal(bank.total(), as_float.sum(0).view(5, 11))
    # 0/1 weights and a 0/1 vector: every product and partial sum is an integer, so the packed reads are exact
    ones = (torch.rand(10, generator=g) < 0.5).float()
    assert torch.equal(bank.combine(ones), (ones @ as_float).view(5, 11))
    assert torch.equal(bank.dots(masks[3].float()), as_float @ masks[3].flatten().float())
    with pytest.raises(IndexError, match="11 mask weights for 10 stored masks"):
        bank.combine(torch.ones(11))


def test_combination_gradient_is_one_packed_dot_product_per_mask():
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(7, 9, generator=g) < 0.5 for _ in range(6)]
    bank = MaskBank((7, 9))
    for m in masks:
        bank.append(m)
    target = torch.randn(7, 9)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)  # the first 5 masks, any float dtype
    (grad,) = torch.autograd.grad((bank.combine(w) * target).sum(), w)
    expected = torch.stack([(m.float() * target).sum() for m in masks[:5]]).double()
    assert grad.dtype == torch.float64 and torch.allclose(grad, expected, atol=1e-5)


def test_bank_keeps_no_float_copy_of_its_masks_and_counts_survive_a_reload():
    """Memory: the packed rows (1 bit per weight, capacity doubling) and one int32 count per weight, whatever the
    number of masks; the counts are rebuilt from the packed rows on load (the checkpoint format is unchanged)."""
    shape, n = (30, 40), 100
    g = torch.Generator().manual_seed(2)
    masks = [torch.rand(shape, generator=g) < 0.5 for _ in range(n)]
    bank = MaskBank(shape)
    for m in masks:
        bank.append(m)
    bank.dots(torch.randn(shape))
    bank.combine(torch.rand(n))
    held = sum(t.numel() * t.element_size() for t in vars(bank).values() if torch.is_tensor(t))
    assert held == 128 * 150 + 4 * 1200  # capacity 128 rows of 150 bytes + the counts
    assert 8 * held / (n * 1200) < 1.7
    state = bank.get_extra_state()
    assert set(state) == {"packed", "count"} and state["packed"].shape == (n, 150)
    restored = MaskBank(shape)
    restored.set_extra_state(state)
    assert torch.equal(restored.total(), torch.stack(masks).float().sum(0))
    restored.append(masks[0])
    assert torch.equal(restored.total(), torch.stack(masks + masks[:1]).float().sum(0))


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


def test_one_shot_task_from_packed_masks_is_the_float_reference_argmin():
    """The one-shot rule read from the packed banks picks the task a float superposition picks: the gradient of the
    mean entropy with respect to beta, at beta uniform over all 40 stored masks, computed with float masks."""
    from kbricks.continual.inference import infer_task
    from kbricks.continual.supsup import SupSup

    body = create_model("masked_mlp", num_classes=10, in_channels=1, image_size=8, hidden=[32, 16])
    net = supermask(body, 0.5, seed=3)
    for m in random_masks(net, 40, seed=5):
        net.store(m)
    strategy = SupSup.__new__(SupSup)
    nn.Module.__init__(strategy)
    strategy.net, strategy.task_classes, strategy.params = net, [10] * 40, SupSup.Config()
    def held_bytes():
        return sum(t.numel() * t.element_size() for layer in net.masked_layers() for t in vars(layer.bank).values() if torch.is_tensor(t))

    held = held_bytes()
    for seed in range(4):
        x = torch.rand(1 + 5 * seed, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        beta = torch.full((40,), 1.0 / 40, requires_grad=True)
        float_masks = [beta @ layer.bank.as_float().view(40, *layer.weight.shape).flatten(1) for layer in net.masked_layers()]
        with net.using(FixedMasks([m.view(layer.weight.shape) for m, layer in zip(float_masks, net.masked_layers())])):
            (expected,) = torch.autograd.grad(mean_entropy(net(x)), beta)
        assert torch.allclose(superposition_gradient(strategy, x, list(range(40))), expected, atol=1e-6)
        assert infer_task(strategy, x) == int(expected.argmin())
    assert held_bytes() == held  # no float view of the banks is built or kept


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


def test_pack_bits_takes_views_at_any_offset_and_round_trips():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(16, 8, generator=g) > 0.5
    flat = bits.reshape(-1)
    for view in (flat[3:59], flat[1:], flat[8:64], bits[:, 1:6], bits.t(), flat[5:5 + 16].view(4, 4)):
        packed = pack_bits(view)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-view.numel() // 8)
        assert torch.equal(unpack_bits(packed, view.numel()), view.reshape(-1))
        # most significant bit first: byte 0 is the first 8 entries read as a binary number
        first = view.reshape(-1)[:8].tolist()
        assert int(packed[0]) == int("".join("1" if b else "0" for b in first).ljust(8, "0"), 2)

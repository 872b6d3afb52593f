import json
import math

import pytest
import torch
import torch.nn.functional as F

from kbricks import build_config
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_training
from kbricks.errors import ConfigError
from kbricks.methods import Batch
from kbricks.methods.dml import dml_loss
from kbricks.methods.maxl import focal_loss, hierarchy_mask, masked_softmax, negative_entropy_of_mean
from kbricks.methods.sskt import soft_cross_entropy, sskt_loss

# ---- pure losses against hand-computed values ----------------------------------------------------------------


def test_soft_cross_entropy_hand_value():
    logits = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4) at T = 1
    assert soft_cross_entropy(logits, target, 1.0).item() == pytest.approx(math.log(2.0), rel=1e-6)
    # T^2 scaling: with everything divided by T, the value is T^2 times the T = 1 value
    assert soft_cross_entropy(logits * 3, target * 3, 3.0).item() == pytest.approx(9 * math.log(2.0), rel=1e-5)
    # equals KL + entropy of the target
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    p = F.softmax(b, 1)
    kl = F.kl_div(F.log_softmax(a, 1), p, reduction="batchmean")
    ent = -(p * p.log()).sum(1).mean()
    assert soft_cross_entropy(a, b, 1.0).item() == pytest.approx((kl + ent).item(), rel=1e-5)


def test_sskt_loss_combines_terms():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    aux = [torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)]
    src = [torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)]
    out = sskt_loss(logits, y, aux, src, alpha=0.3, temperature=2.0)
    manual = F.cross_entropy(logits, y) + 0.3 * (soft_cross_entropy(aux[0], src[0], 2.0) + soft_cross_entropy(aux[1], src[1], 2.0))
    assert out["loss"].item() == pytest.approx(manual.item(), rel=1e-6)
    assert sskt_loss(logits, y, aux, src, 0.0, 2.0)["loss"].item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_dml_loss_hand_values():
    a = torch.tensor([[1.0, 0.0]])
    same = dml_loss([a, a.clone()], torch.tensor([0]))
    ce = F.cross_entropy(a, torch.tensor([0])).item()
    assert same["kl_0"].item() == pytest.approx(0.0, abs=1e-7) and same["loss"].item() == pytest.approx(2 * ce, rel=1e-6)
    b = torch.tensor([[0.0, 1.0]])
    out = dml_loss([a, b], torch.tensor([0]))
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    kl_b_a = (q * (q.log() - p.log())).sum().item()
    assert out["kl_0"].item() == pytest.approx(kl_b_a, rel=1e-5)


def test_maxl_pieces():
    m = hierarchy_mask(3, 2)
    assert m.tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    p = masked_softmax(torch.randn(4, 6), torch.tensor([0, 2, 1, 2]), m)
    assert torch.allclose(p.sum(1), torch.ones(4))
    assert (p[0, 2:] == 0).all() and (p[1, :4] == 0).all()
    target = F.softmax(torch.randn(5, 3), 1)
    logits = torch.randn(5, 3)
    assert focal_loss(logits, target, 0.0).item() == pytest.approx(-(target * F.log_softmax(logits, 1)).sum(1).mean().item(), rel=1e-6)
    assert focal_loss(logits, target, 2.0) < focal_loss(logits, target, 0.0)
    uniform = torch.full((4, 3), 1 / 3)
    assert negative_entropy_of_mean(uniform).item() == pytest.approx(-math.log(3), rel=1e-5)


# ---- methods on tiny data -----------------------------------------------------------------------------------

BASE = {"data": {"name": "digits", "kwargs": {"labels_per_class": 10}},
        "model": {"name": "resnet8", "kwargs": {"width": 8}},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 2, "batch_size": 32, "progress": "off", "plots": False}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    cfgs = {
        "mnist8": {"data": {"name": "mnist5k_8x8", "train_subset": 600}, "model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}}},
        "shapes8": {"data": {"name": "shapes8", "kwargs": {"n_samples": 400}}, "model": {"name": "mlp", "kwargs": {"hidden": [32]}}},
    }
    out = {}
    for name, c in cfgs.items():
        run_training(build_config({**c, "train": {"epochs": 2, "batch_size": 64, "progress": "off", "plots": False}}), root / name)
        out[name] = root / name
    return out


def cfg_with(method, **over):
    data = json.loads(json.dumps(BASE))
    data["method"] = method
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


def one_step(exp):
    x = exp.transform(exp.data.train.x[:32], train=True)
    batch = Batch(x=x, y=exp.data.train.y[:32], raw=exp.data.train.x[:32])
    opt = torch.optim.SGD(list(exp.method.trainable_parameters()), lr=0.1)
    exp.method.train()
    losses = exp.method.training_step(batch)
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    return losses


def test_sources_get_no_gradient_and_stay_in_eval(sources):
    exp = build_experiment(cfg_with({"name": "sskt", "sources": [str(sources["mnist8"]), str(sources["shapes8"])], "alpha": 1.0}))
    m = exp.method
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in m.sources]
    losses = one_step(exp)
    assert set(losses) >= {"loss", "ce", "aux", "aux_0", "aux_1"} and losses["aux"] > 0
    for s, b in zip(m.sources, before):
        assert not s.training and all(p.grad is None and not p.requires_grad for p in s.parameters())
        assert all(torch.equal(v, b[k]) for k, v in s.state_dict().items())  # BN running stats untouched
    assert all(h.weight.grad is not None for h in m.heads)
    assert [h.out_features for h in m.heads] == [10, 6]  # each head has its source's label space


def test_heads_are_dropped_from_the_exported_model(sources, tmp_path):
    from kbricks.core.checkpoint import load_safetensors
    from kbricks.models.frozen import load_trained_model

    run_training(cfg_with({"name": "sskt", "sources": [str(sources["mnist8"])], "transfer_module": True}), tmp_path / "s")
    run_training(cfg_with({"name": "supervised"}), tmp_path / "plain")
    keys = set(load_safetensors(tmp_path / "s/model.safetensors"))
    assert keys == set(load_safetensors(tmp_path / "plain/model.safetensors"))
    assert not any(k.startswith(("heads", "sources")) for k in keys)
    net, card = load_trained_model(tmp_path / "s")
    assert sum(p.numel() for p in net.parameters()) == card["metrics"]["params"]


def test_transfer_module_needs_stage_features(sources):
    with pytest.raises(ConfigError, match="stage_features"):
        build_experiment(cfg_with({"name": "sskt", "sources": [str(sources["mnist8"])], "transfer_module": True}, **{"model.name": "small_cnn", "model.kwargs": "{}"}))


def test_maxl_meta_gradient_reaches_the_label_generator():
    exp = build_experiment(cfg_with({"name": "maxl", "psi": 3, "generator_lr": 0.1}))
    m = exp.method
    gen_before = [p.clone() for p in m.generator.parameters()]
    net_before = [p.clone() for p in m.net.parameters()]
    x = exp.transform(exp.data.train.x[:32], train=True)
    m.train()
    m.meta_step(x, exp.data.train.y[:32], lr=0.05)
    changed = [not torch.equal(a, b) for a, b in zip(gen_before, m.generator.parameters())]
    assert sum(changed) >= len(changed) - 2  # second-order signal reached (nearly) every generator tensor
    assert all(torch.equal(a, b) for a, b in zip(net_before, m.net.parameters()))  # the meta step moves only g
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters() if p.dim() > 1)
    assert not set(map(id, m.trainable_parameters())) & set(map(id, m.generator.parameters()))


def test_maxl_look_ahead_uses_the_given_learning_rate():
    """theta1+ = theta1 - lr * grad: at lr = 0 the look-ahead does not depend on g, so (without the entropy term and
    weight decay) the meta step cannot move g; at the current lr it does. g's lr follows f's schedule factor."""
    exp = build_experiment(cfg_with({"name": "maxl", "psi": 3, "generator_lr": 0.1, "entropy_weight": 0.0, "generator_weight_decay": 0.0}))
    m = exp.method.train()
    x, y = exp.transform(exp.data.train.x[:32], train=True), exp.data.train.y[:32]
    before = [p.clone() for p in m.generator.parameters()]
    m.meta_step(x, y, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, m.generator.parameters()))
    m.meta_step(x, y, lr=0.05, lr_factor=0.5)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.generator.parameters()))
    assert m.gen_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # generator_lr x f's schedule factor


def test_maxl_updates_f_over_an_epoch_then_g_over_the_training_set(tmp_path):
    """The paper's order: an epoch of f updates with g fixed, then g's meta pass; never g before f."""
    from kbricks.core.hooks import Hook

    seen = []

    class Watch(Hook):
        def on_fit_start(self, trainer):
            self.g0 = [p.clone() for p in trainer.method.generator.parameters()]
            self.f0 = [p.clone() for p in trainer.method.net.parameters()]

        def on_step_end(self, trainer, step, losses):
            m = trainer.method
            g_same = all(torch.equal(a, b) for a, b in zip(self.g0, m.generator.parameters()))
            f_same = all(torch.equal(a, b) for a, b in zip(self.f0, m.net.parameters()))
            seen.append((len(seen) // trainer.steps_per_epoch, g_same, f_same, m.last_meta_loss.item()))

    cfg = cfg_with({"name": "maxl", "psi": 2}, **{"train.epochs": 2, "optim.schedule": "cosine"})
    run_training(cfg, tmp_path / "maxl", hooks=[Watch()])
    first = [s for s in seen if s[0] == 0]
    second = [s for s in seen if s[0] == 1]
    assert first and all(g_same and not f_same and meta == 0.0 for _, g_same, f_same, meta in first)
    assert second and all(not g_same and meta != 0.0 for _, g_same, _, meta in second)


def test_dml_peers_both_update():
    exp = build_experiment(cfg_with({"name": "dml", "peers": 2}))
    before = [[p.clone() for p in peer.parameters()] for peer in exp.method.peers]
    losses = one_step(exp)
    for peer, b in zip(exp.method.peers, before):
        assert any(not torch.equal(x, y) for x, y in zip(b, peer.parameters()))
    assert {"ce_0", "ce_1", "kl_0", "kl_1"} <= set(losses)


def test_kd_from_mismatched_label_space_is_refused_clearly(sources, tmp_path):
    with pytest.raises(ConfigError, match="predicts 6 classes but the data has 10; KD needs a shared label space"):
        run_training(cfg_with({"name": "kd", "teacher": str(sources["shapes8"])}), tmp_path / "k")


def test_few_label_split():
    from kbricks.data import load_dataset

    d = load_dataset("digits", labels_per_class=5, split_seed=2)
    assert torch.bincount(d.train.y).tolist() == [5] * 10 and len(d.train) + len(d.test) == 1797
    again = load_dataset("digits", labels_per_class=5, split_seed=2)
    assert torch.equal(d.train.x, again.train.x)
    from kbricks.errors import DataError

    with pytest.raises(DataError, match="labels_per_class"):
        load_dataset("digits", labels_per_class=500)


def test_sweep_writes_mean_and_std(tmp_path):
    import yaml

    from kbricks.engine.sweep import run_sweep

    p = tmp_path / "c.yaml"
    data = json.loads(json.dumps(BASE))
    data["model"] = {"name": "mlp", "kwargs": {"hidden": [16]}}
    p.write_text(yaml.safe_dump(data))
    s = run_sweep(p, [0, 1], tmp_path / "sw")
    accs = [r["last_acc"] for r in s["runs"]]
    assert s["last_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert s["last_acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert (tmp_path / "sw/sweep.json").exists() and (tmp_path / "sw/sweep.csv").read_text().startswith("seed,last_acc,best_acc")
    # paired splits: the two seeds trained on different labelled images
    c0 = yaml.safe_load((tmp_path / "sw/seed0/config.yaml").read_text())
    assert c0["data"]["kwargs"]["split_seed"] == 0

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kbricks import build_config
from kbricks.core.checkpoint import load_safetensors, save_safetensors
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_training
from kbricks.errors import CheckpointError
from kbricks.methods.kd import kd_loss
from kbricks.methods.kf import batch_gaussian_kl, gaussian_kl, imb_loss, info_nce, infomax_bound, merge_other
from kbricks.methods.kf.bricks import BrickMismatchError, assemble, load_brick, save_assembled

# ---- loss terms ---------------------------------------------------------------------------------------------


def test_kd_loss_zero_for_identical_and_hand_value():
    t = torch.randn(5, 4)
    assert kd_loss(t, t, 3.0).abs() < 1e-6
    s, te = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # teacher p = (3/4, 1/4) at T=1
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, te, 1.0).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(s, te * 2, 2.0).item() == pytest.approx(4 * expected, rel=1e-5)  # T^2 scaling


def test_gaussian_kl_zero_case_and_hand_value():
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    assert gaussian_kl(torch.ones(2, 1), torch.zeros(2, 1)).item() == pytest.approx(0.5)
    lv = torch.full((1, 2), math.log(2.0))
    assert gaussian_kl(torch.zeros(1, 2), lv).item() == pytest.approx(2 * 0.5 * (2 - 1 - math.log(2)))


def test_info_nce_bounds():
    n = 6
    same = torch.ones(n, 3)
    assert info_nce(same, same, 0.5).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)  # no information
    z = torch.eye(n) * 10
    aligned = info_nce(z, z, 0.1).item()
    shuffled = info_nce(z, z[torch.randperm(n, generator=torch.Generator().manual_seed(1))], 0.1).item()
    assert aligned < 1e-3 < math.log(2 * n - 1) < shuffled


def test_merge_other_preserves_tempered_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 10, generator=g) * 3
    for temp in (1.0, 4.0):
        merged = merge_other(logits, [2, 5, 7], temp)
        p_full = F.softmax(logits / temp, 1)
        p_merged = F.softmax(merged / temp, 1)
        assert torch.allclose(p_merged[:, :3], p_full[:, [2, 5, 7]], atol=1e-6)
        assert torch.allclose(p_merged[:, 3], 1 - p_full[:, [2, 5, 7]].sum(1), atol=1e-6)


def test_imb_loss_terms_signs_and_weights():
    g = torch.Generator().manual_seed(0)
    f = [torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)]
    t = [torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)]
    y = [torch.randint(0, 3, (8,), generator=g), torch.randint(0, 4, (8,), generator=g)]
    mu = [torch.randn(8, 2, generator=g) for _ in f]
    lv = [torch.randn(8, 2, generator=g) for _ in f]
    im = info_nce(torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), 0.5)
    out = imb_loss(f, t, y, mu, lv, im, temperature=2.0, kd_weight=0.7, ce_weight=0.2, beta=0.01, infomax_weight=0.3)
    for k in ("kd", "ce", "bottleneck", "infomax"):
        assert torch.isfinite(out[k]) and out[k] > 0, k
    manual = 0.7 * out["kd"] + 0.2 * out["ce"] + 0.01 * out["bottleneck"] + 0.3 * out["infomax"]
    assert out["loss"].item() == pytest.approx(manual.item(), rel=1e-6)
    assert out["bottleneck"].item() == pytest.approx(sum(gaussian_kl(m, v) for m, v in zip(mu, lv)).item(), rel=1e-6)
    off = imb_loss(f, t, [None, None], mu, lv, None, beta=0.0, infomax_weight=0.0)
    assert off["ce"] == 0 and off["infomax"] == 0 and off["loss"].item() == pytest.approx(off["kd"].item())
    zero_kl = imb_loss(f, t, y, [torch.zeros(8, 2)] * 2, [torch.zeros(8, 2)] * 2, None)
    assert zero_kl["bottleneck"] == 0
    # the official variants: batch-statistics bottleneck on the codes, label-smoothed CE
    batch = imb_loss(f, t, y, mu, lv, None, bottleneck="batch", label_smoothing=0.1)
    assert batch["bottleneck"].item() == pytest.approx(sum(batch_gaussian_kl(m) for m in mu).item(), rel=1e-6)
    smooth = sum(F.cross_entropy(a, b, label_smoothing=0.1) for a, b in zip(f, y))
    assert batch["ce"].item() == pytest.approx(smooth.item(), rel=1e-6)


def test_batch_gaussian_kl_is_the_official_bottleneck():
    """KL(N(mean_B, var_B) || N(0, 1)) per dimension from batch statistics, averaged over dimensions."""
    g = torch.Generator().manual_seed(0)
    standard = torch.randn(20000, 3, generator=g)
    assert batch_gaussian_kl(standard).item() == pytest.approx(0.0, abs=1e-3)  # already N(0, 1): nothing to pay
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # dim 0: mean 2, unbiased var 2; dim 1: mean 0, var 0 (clamped)
    d0 = -0.5 * (1 + math.log(2.0) - 4.0 - 2.0)
    d1 = -0.5 * (1 + math.log(1e-8) - 0.0 - 1e-8)
    assert batch_gaussian_kl(z).item() == pytest.approx((d0 + d1) / 2, rel=1e-5)
    # it penalises a spread above 1 as well as below: it standardises, it does not shrink a deterministic code
    assert batch_gaussian_kl(3 * standard) > 1.0 and batch_gaussian_kl(0.3 * standard) > 0.3


def test_infomax_bound_official_normalisation_and_textbook_dv():
    b = 4
    u = torch.eye(b)
    # perfectly aligned pairs, orthogonal negatives: S = I
    official = -(b / b**2 - math.log((b + (b * b - b) * math.exp(0.0)) / b**2))
    assert infomax_bound(u, u, "official").item() == pytest.approx(official, rel=1e-6)
    assert infomax_bound(u, u, "dv").item() == pytest.approx(-(1.0 - math.log(1.0)), rel=1e-6)
    # a hand-computed 2 x 2 case with general cosines
    v = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)  # S = [[c, c], [c, -c]]
    joint_official, marginal_official = (c - c) / 4, (1 + 1 + math.exp(c) + math.exp(c)) / 4
    assert infomax_bound(v, w, "official").item() == pytest.approx(-(joint_official - math.log(marginal_official)), rel=1e-6)
    assert infomax_bound(v, w, "dv").item() == pytest.approx(-((c - c) / 2 - math.log(math.exp(c))), rel=1e-6)
    # aligned pairs score better (lower loss) than shuffled pairs, for both normalisations
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    perm = torch.randperm(32, generator=g)
    for bound in ("official", "dv"):
        assert infomax_bound(x, x, bound) < infomax_bound(x, x[perm], bound)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("partition", [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [[0, 3, 7], [1, 2], [4, 5, 6, 8, 9]]])
def test_union_of_exactly_distilled_factors_predicts_like_the_teacher(temperature, partition):
    """Property: factors equal to their exact tempered targets (the teacher's tempered softmax over [own classes,
    other]) assemble into a union classifier whose argmax is the teacher's, on every random logit vector."""
    from kbricks.data import class_partition
    from kbricks.models.factorized import combined_class_scores

    g = torch.Generator().manual_seed(int(temperature * 10) + len(partition))
    teacher = 3.0 * torch.randn(4000, 10, generator=g)  # spread logits: confident and unsure rows alike
    tasks = class_partition(partition, 10)
    factors = [merge_other(teacher, t.classes, temperature) for t in tasks]
    union = combined_class_scores(factors, tasks, 10, [temperature] * len(tasks))
    assert torch.equal(union.argmax(1), teacher.argmax(1))
    # the union is the teacher's own tempered log-softmax
    assert torch.allclose(union, F.log_softmax(teacher / temperature, 1), atol=1e-4)
    if temperature != 1.0:  # reading the same factors at T = 1 (the old bug) disagrees with the teacher somewhere
        wrong = combined_class_scores(factors, tasks, 10, [1.0] * len(tasks))
        assert (wrong.argmax(1) != teacher.argmax(1)).any()


def test_task_only_head_term():
    """The task-only head on z_t gets T^2 KD to the same tempered target plus CE, summed over tasks, times task_weight."""
    g = torch.Generator().manual_seed(1)
    f = [torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)]
    t = [torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)]
    a = [torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)]
    y = [torch.randint(0, 3, (6,), generator=g), torch.randint(0, 4, (6,), generator=g)]
    mu = lv = [torch.zeros(6, 2)] * 2
    base = imb_loss(f, t, y, mu, lv, None, temperature=2.0, task_only_logits=None)
    out = imb_loss(f, t, y, mu, lv, None, temperature=2.0, task_only_logits=a, task_weight=0.5)
    expected = sum(kd_loss(ai, ti, 2.0) + F.cross_entropy(ai, yi) for ai, ti, yi in zip(a, t, y))
    assert out["task_only"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(base["loss"].item() + 0.5 * expected.item(), rel=1e-6)
    no_labels = imb_loss(f, t, [None, None], mu, lv, None, temperature=2.0, task_only_logits=a)
    assert no_labels["task_only"].item() == pytest.approx(sum(kd_loss(ai, ti, 2.0) for ai, ti in zip(a, t)).item(), rel=1e-6)
    off = imb_loss(f, t, y, mu, lv, None, temperature=2.0, task_only_logits=a, task_weight=0.0)
    assert off["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-6)  # logged, not optimised
    # the official task-only head: CE with the labels only
    ce_only = imb_loss(f, t, y, mu, lv, None, temperature=2.0, task_only_logits=a, task_head_loss="ce")
    assert ce_only["task_only"].item() == pytest.approx(sum(F.cross_entropy(ai, yi) for ai, yi in zip(a, y)).item(), rel=1e-6)


# ---- end to end on tiny digits ------------------------------------------------------------------------------

TINY = {"data": {"name": "digits", "train_subset": 512}, "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "train": {"batch_size": 64, "progress": "off", "plots": False}}


def _cfg(extra, *over):
    data = json.loads(json.dumps(TINY))
    for k, v in extra.items():
        data.setdefault(k, {}) if isinstance(v, dict) else None
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return build_config(data, list(over))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher") / "run"
    run_training(_cfg({"model": {"name": "small_cnn", "kwargs": {"widths": [16, 32]}}}, "train.epochs=6"), d)
    return d


def _kf_cfg(teacher_dir, seed=0, tasks="{split: 2}", epochs=5):
    return _cfg(
        {"model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}},
         "method": {"name": "kf", "teacher": str(teacher_dir), "tsn": {"name": "mlp", "kwargs": {"hidden": [32]}}, "tsn_dim": 4}},
        f"train.epochs={epochs}", f"seed={seed}", f"data.tasks={tasks}",
    )


@pytest.fixture(scope="module")
def kf_run(teacher_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("kf") / "run"
    summary = run_training(_kf_cfg(teacher_dir), d)
    return d, summary


def test_tiny_factorization_beats_chance_and_writes_bricks(kf_run):
    d, summary = kf_run
    assert summary["final"]["test/acc"] > 0.5  # chance 0.1
    assert summary["final"]["test/acc_classes_0-1-2-3-4"] > 0.5 and summary["final"]["test/acc_classes_5-6-7-8-9"] > 0.5
    names = sorted(p.name for p in (d / "bricks").iterdir())
    assert names == sorted(["ckn.json", "ckn.safetensors", "tsn-classes_0-1-2-3-4.json", "tsn-classes_0-1-2-3-4.safetensors",
                            "tsn-classes_5-6-7-8-9.json", "tsn-classes_5-6-7-8-9.safetensors"])
    card = json.loads((d / "model.json").read_text())
    assert card["network"] == "factors"


def test_assembled_outputs_equal_per_brick_outputs(kf_run, teacher_dir):
    d, _ = kf_run
    cfg = _kf_cfg(teacher_dir)
    exp = build_experiment(cfg)
    from kbricks.core.checkpoint import load_checkpoint

    exp.method.load_state_dict(load_checkpoint(d / "ckpt/last.pt")["model"])
    exp.method.eval()
    raw = exp.data.test.x[:40]
    x = exp.transform(raw, train=False)
    net = assemble(d / "bricks/ckn.json", [d / "bricks/tsn-classes_0-1-2-3-4.json", d / "bricks/tsn-classes_5-6-7-8-9.json"])
    with torch.no_grad():
        trained = exp.method.factors(x)
        z_c = net.factors.ckn.features(x)
        per_brick = [tsn(x, z_c, sample=False)[0] for tsn in net.factors.tsns]
        # the assembled network takes raw inputs: it applies the bricks' normalisation itself
        for a, b, c in zip(trained, per_brick, net.factor_outputs(raw)):
            assert torch.equal(a, b) and torch.equal(b, c)
        scores = net(raw)
        # the union classifier is each factor's log-probabilities at its distillation temperature, in class order
        t = net.temperatures[0]
        assert t == 4.0 and net.temperatures == [t, t]
        assert torch.allclose(scores[:, :5], F.log_softmax(per_brick[0] / t, 1)[:, :5])
        assert torch.allclose(scores[:, 5:], F.log_softmax(per_brick[1] / t, 1)[:, :5])
        assert torch.equal(scores, exp.method.predict(x))
    # a single brick gives a classifier over its own classes only
    solo = assemble(d / "bricks/ckn.json", [d / "bricks/tsn-classes_5-6-7-8-9.json"])
    with torch.no_grad():
        s = solo(raw)
    assert torch.isinf(s[:, :5]).all() and torch.isfinite(s[:, 5:]).all()
    assert solo.classes == [5, 6, 7, 8, 9]


def test_manifest_round_trip_and_tamper_detection(kf_run, tmp_path):
    d, _ = kf_run
    m, tensors = load_brick(d / "bricks/tsn-classes_5-6-7-8-9.json")
    assert m["kind"] == "tsn" and m["task"]["classes"] == [5, 6, 7, 8, 9] and m["class_names"] == ["5", "6", "7", "8", "9"]
    assert m["ckn_architecture"]["name"] == "small_cnn" and m["architecture"]["dim"] == 4
    assert m["num_outputs"] == 6  # 5 classes + 'other'
    ckn, _ = load_brick(d / "bricks/ckn")
    assert m["ckn_fingerprint"] == ckn["fingerprint"] and ckn["provenance"]["teacher"]
    assert torch.equal(load_safetensors(d / "bricks/tsn-classes_5-6-7-8-9.safetensors")["head.weight"], tensors["head.weight"])
    # tampered weights are refused
    import shutil

    bad = tmp_path / "bricks"
    shutil.copytree(d / "bricks", bad)
    t = load_safetensors(bad / "ckn.safetensors")
    first = next(iter(t))
    t[first] = t[first] + 1
    save_safetensors(t, bad / "ckn.safetensors")
    with pytest.raises(CheckpointError, match="do not match the manifest fingerprint"):
        load_brick(bad / "ckn.json")
    (bad / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a kbricks brick manifest"):
        load_brick(bad / "x.json")
    # edited behaviour-deciding metadata (swapped classes, another temperature) is refused like edited weights
    for field, value in (("task", dict(m["task"], classes=[6, 5, 7, 8, 9])), ("temperature", 1.0), ("normalize", {"mean": None, "std": None})):
        shutil.copy(d / "bricks/tsn-classes_5-6-7-8-9.safetensors", bad / "tsn-classes_5-6-7-8-9.safetensors")
        (bad / "tsn-classes_5-6-7-8-9.json").write_text(json.dumps(dict(m, **{field: value})))
        with pytest.raises(CheckpointError, match="signed fields .* were modified"):
            load_brick(bad / "tsn-classes_5-6-7-8-9.json")
    (bad / "tsn-classes_5-6-7-8-9.json").write_text(json.dumps({k: v for k, v in m.items() if k != "ckn_fingerprint"}))
    with pytest.raises(CheckpointError, match=r"lacks \['ckn_fingerprint'\]"):
        load_brick(bad / "tsn-classes_5-6-7-8-9.json")
    out = save_assembled(assemble(d / "bricks/ckn.json", [d / "bricks/tsn-classes_0-1-2-3-4.json"]), tmp_path / "asm")
    asm = json.loads(out.read_text())
    assert asm["ckn"] == ckn["fingerprint"] and asm["classes"] == [0, 1, 2, 3, 4]


def test_mismatched_bricks_are_refused(kf_run, teacher_dir, tmp_path):
    d, _ = kf_run
    other = tmp_path / "other"
    run_training(_kf_cfg(teacher_dir, seed=1, epochs=1), other)
    with pytest.raises(BrickMismatchError, match="bricks only assemble with the CKN they were factorized with"):
        assemble(d / "bricks/ckn.json", [other / "bricks/tsn-classes_0-1-2-3-4.json"])
    with pytest.raises(BrickMismatchError, match="repeats task"):
        assemble(d / "bricks/ckn.json", [d / "bricks/tsn-classes_0-1-2-3-4.json"] * 2)
    with pytest.raises(BrickMismatchError, match="not a CKN"):
        assemble(d / "bricks/tsn-classes_0-1-2-3-4.json", [d / "bricks/tsn-classes_0-1-2-3-4.json"])
    # a (properly signed) TSN whose manifest declares another CKN architecture
    from kbricks.methods.kf.bricks import signature

    m = json.loads((d / "bricks/tsn-classes_0-1-2-3-4.json").read_text())
    m["ckn_architecture"] = dict(m["ckn_architecture"], name="resnet20")
    m["fingerprint"] = signature(m["weights_fingerprint"], m)
    import shutil

    shutil.copy(d / "bricks/tsn-classes_0-1-2-3-4.safetensors", tmp_path / "tsn-classes_0-1-2-3-4.safetensors")
    (tmp_path / "tsn-classes_0-1-2-3-4.json").write_text(json.dumps(m))
    with pytest.raises(BrickMismatchError, match="another architecture"):
        assemble(d / "bricks/ckn.json", [tmp_path / "tsn-classes_0-1-2-3-4.json"])


def test_kf_report_with_kd_baseline(kf_run, teacher_dir, tmp_path):
    from kbricks.engine.evaluate import evaluate_run

    d, _ = kf_run
    kd = tmp_path / "kd"
    kd_cfg = _cfg({"model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}}, "method": {"name": "kd", "teacher": str(teacher_dir)}}, "train.epochs=2")
    run_training(kd_cfg, kd)
    r = evaluate_run(d, baseline=kd)
    assert r["assembled_matches_factors"] is True
    for k in ("kf/acc", "teacher/acc", "kd/acc", "assembled/acc", "kd/acc_classes_0-1-2-3-4", "assembled_single/classes_5-6-7-8-9"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["teacher/acc"] > 0.8 and r["kf/params"] > 0 and r["kd/params"] > 0
    assert (d / "kf_report.json").exists() and (d / "kf_report.csv").exists()


def test_kf_on_dsprites_latent_tasks_reports_mig_and_transfer(tmp_path, monkeypatch):
    from kbricks.engine.evaluate import evaluate_run
    from kbricks.methods.kf import analysis

    monkeypatch.setattr(analysis, "PROBE_WEIGHT_DECAYS", (1e-3,))  # one probe fit per latent keeps the test short

    base = {"data": {"name": "dsprites", "kwargs": {"n_samples": 600, "image_size": 16, "num_orientations": 4, "num_positions": 4},
                     "tasks": {"latents": ["shape", "scale", "orientation", "pos_x", "pos_y"]}, "augment": {"normalize": False}},
            "model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}},
            "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0},
            "train": {"epochs": 2, "batch_size": 64, "progress": "off", "plots": False}}
    run_training(build_config(base), tmp_path / "t")
    kf = json.loads(json.dumps(base))
    kf["data"]["tasks"] = {"latents": ["shape", "scale"]}
    kf["method"] = {"name": "kf", "teacher": str(tmp_path / "t"), "tsn": {"name": "mlp", "kwargs": {"hidden": [16]}}, "tsn_dim": 2}
    run_training(build_config(kf), tmp_path / "kf")
    kd = json.loads(json.dumps(kf))
    kd["method"] = {"name": "kd", "teacher": str(tmp_path / "t")}
    run_training(build_config(kd), tmp_path / "kd")
    r = evaluate_run(tmp_path / "kf", baseline=tmp_path / "kd")
    reps = ("kf_codes", "kf_ckn", "kd", "teacher", "random_ckn", "random_kd")
    for rep in reps:  # one protocol for every representation, raw dimensions
        for metric in ("mig", "dci_d", "dci_c", "dci_i", "sap"):
            assert 0 <= r[f"rep/{rep}/{metric}"] <= 1, (rep, metric)
    assert r["rep/kf_codes/dims"] == 4 and r["rep/kd/dims"] == 16 and r["rep/random_kd/dims"] == 16
    for rep in reps:
        for latent in ("orientation", "pos_x", "pos_y"):  # the latents that are not KF tasks
            assert 0 <= r[f"transfer/{rep}/{latent}"] <= 1
    assert r["assembled_matches_factors"] is True and r["assembled_max_abs_diff"] <= 1e-5 and "kf/acc_shape" in r


def test_kd_teacher_frozen_and_in_eval_mode(teacher_dir):
    cfg = _cfg({"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "method": {"name": "kd", "teacher": str(teacher_dir)}})
    exp = build_experiment(cfg)
    m = exp.method.train()
    assert not m.teacher.training and all(not p.requires_grad for p in m.teacher.parameters())
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    from kbricks.methods import Batch

    x = exp.transform(exp.data.train.x[:32], train=False)
    losses = m.training_step(Batch(x=x, y=exp.data.train.y[:32]))
    losses["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())  # BN stats untouched
    assert set(losses) == {"loss", "kd", "ce"}


def test_teacher_renormalises_inputs(teacher_dir):
    from kbricks.models.frozen import load_frozen, load_trained_model

    net, card = load_trained_model(teacher_dir)
    mean, std = card["normalize"]["mean"], card["normalize"]["std"]
    raw = torch.rand(4, 1, 8, 8)
    own = (raw - mean[0]) / std[0]
    plain = load_frozen(teacher_dir, None)  # the caller feeds [0, 1] images
    other = load_frozen(teacher_dir, {"mean": [0.5], "std": [0.25]})  # the caller normalised differently
    with torch.no_grad():
        ref = net.eval()(own)
        assert torch.allclose(plain(raw), ref, atol=1e-5)
        assert torch.allclose(other((raw - 0.5) / 0.25), ref, atol=1e-5)


def test_kf_run_is_not_loadable_as_a_teacher(kf_run):
    from kbricks.models.frozen import load_trained_model

    with pytest.raises(CheckpointError, match="load its bricks instead"):
        load_trained_model(kf_run[0])


def test_assemble_cli_evaluates_against_the_teacher(kf_run, tmp_path, capsys):
    from kbricks.cli import main

    d, summary = kf_run
    b = d / "bricks"
    assert main(["assemble", str(b / "ckn.json"), str(b / "tsn-classes_0-1-2-3-4.json"), str(b / "tsn-classes_5-6-7-8-9.json"),
                 "--out", str(tmp_path / "asm"), "--evaluate"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == list(range(10)) and (tmp_path / "asm/assembled.safetensors").exists()
    assert out["assembled/acc"] == pytest.approx(summary["final"]["test/acc"])  # same test split, same network
    assert 0.5 < out["teacher/acc"] <= 1.0
    assert main(["assemble", str(b / "ckn.json"), str(b / "ckn.json"), "--out", str(tmp_path / "bad")]) == 2
    assert "not a TSN" in capsys.readouterr().err


# ---- the selectable objective: official InfoMax at matched layers, batch bottleneck, variants -------------------


def _one_step(exp, n=48):
    from kbricks.methods import Batch

    x = exp.transform(exp.data.train.x[:n], train=True)
    exp.method.train()
    losses = exp.method.training_step(Batch(x=x, y=exp.data.train.y[:n], raw=exp.data.train.x[:n]))
    losses["loss"].backward()
    return losses


def test_official_infomax_at_matched_layers_sizes_projectors_and_trains_them(teacher_dir):
    # teacher small_cnn [16, 32], CKN small_cnn [8, 16]: blocks body.1 (16 -> 8 channels) and body.4 (32 -> 16)
    cfg = _kf_cfg(teacher_dir)
    cfg = build_config({**cfg.to_dict(), "method": {**cfg.to_dict()["method"], "infomax_layers": [["body.1", "body.1"], ["body.4", "body.4"]]}})
    exp = build_experiment(cfg)
    m = exp.method
    assert m.params.infomax == "teacher" and m.params.infomax_weight == 1.0  # the official default weight
    assert [(g[0].in_features, g[-1].out_features) for g in m.projectors] == [(16, 8), (32, 16)]
    assert all(not p.requires_grad for p in m.teacher.parameters())
    bn_before = m.factors.ckn.body[0][1].running_mean.clone()  # sizing the projectors did not touch the CKN's BN
    exp2 = build_experiment(cfg)
    assert torch.equal(bn_before, exp2.method.factors.ckn.body[0][1].running_mean)
    losses = _one_step(exp)
    assert torch.isfinite(losses["infomax"]) and losses["infomax"] != 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for g in m.projectors for p in g.parameters() if p.dim() > 1)
    # the bound is averaged over the matched layers, computed from the taps of the forward passes that ran
    with torch.no_grad():
        from kbricks.methods.kf import infomax_bound

        x = exp.transform(exp.data.train.x[:48], train=False)
        m.eval()
        t_feats, c_feats = m._infomax_features(x)
        assert [t.shape[1] for t in t_feats] == [16, 32] and [c.shape[1] for c in c_feats] == [8, 16]
        assert torch.allclose(c_feats[-1], m.factors.ckn.features(x), atol=1e-6)  # the last block, pooled = features
        ref = torch.stack([infomax_bound(g(t), c) for g, t, c in zip(m.projectors, t_feats, c_feats)]).mean()
        assert torch.isfinite(ref)


def test_unknown_infomax_layer_is_a_config_error(teacher_dir):
    from kbricks.errors import ConfigError

    cfg = _kf_cfg(teacher_dir)
    cfg = build_config({**cfg.to_dict(), "method": {**cfg.to_dict()["method"], "infomax_layers": [["body.99", "body.1"]]}})
    with pytest.raises(ConfigError, match="the teacher has no layer 'body.99'; its layers include"):
        build_experiment(cfg)


@pytest.mark.parametrize("over", [["method.infomax=views"], ["method.bottleneck=batch"], ["method.infomax_weight=0", "method.task_head_loss=ce"]])
def test_objective_variants_take_a_step(teacher_dir, over):
    cfg = _kf_cfg(teacher_dir)
    exp = build_experiment(build_config(cfg.to_dict(), over))
    m = exp.method
    losses = _one_step(exp)
    assert set(losses) == {"loss", "kd", "ce", "bottleneck", "infomax", "task_only"} and torch.isfinite(losses["loss"])
    if "method.infomax=views" in over:
        assert m.params.infomax_weight == 0.1 and hasattr(m, "projector") and losses["infomax"] > 0
    if "method.bottleneck=batch" in over:  # deterministic codes, the batch-statistics KL of their means
        from kbricks.methods.kf import batch_gaussian_kl

        x = exp.transform(exp.data.train.x[:48], train=True)
        z_c = m.factors.ckn.features(x)
        a, b = m.factors.tsn_outputs(x, z_c, sample=False), m.factors.tsn_outputs(x, z_c, sample=False)
        assert torch.equal(a[0][0], b[0][0])
        assert losses["bottleneck"] > 0 and batch_gaussian_kl(a[1][0]).item() > 0
    if "method.infomax_weight=0" in over:
        assert losses["infomax"] == 0 and not hasattr(m, "projectors") and not hasattr(m, "projector")


def test_factors_trained_without_kd_assemble_at_temperature_one(teacher_dir, tmp_path):
    """Without the KD term a factor is calibrated by its labels at T = 1, so that is the temperature its brick
    records and the union classifier reads it at."""
    run_training(build_config(_kf_cfg(teacher_dir, epochs=1).to_dict(), ["method.kd_weight=0"]), tmp_path / "nokd")
    m = json.loads((tmp_path / "nokd/bricks/tsn-classes_0-1-2-3-4.json").read_text())
    assert m["temperature"] == 1.0
    net = assemble(tmp_path / "nokd/bricks/ckn.json", [tmp_path / "nokd/bricks/tsn-classes_0-1-2-3-4.json"])
    assert net.temperatures == [1.0]


# ---- representation analysis: one protocol for every representation ------------------------------------------


def _factors(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 3, (n,), generator=g), torch.randint(0, 6, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)], 1)


def test_mig_on_raw_dimensions_tells_aligned_from_mixed_codes():
    from kbricks.methods.kf.analysis import mutual_info_gap

    f = _factors()
    aligned = f.float() + 0.01 * torch.randn(f.shape, generator=torch.Generator().manual_seed(1))
    assert mutual_info_gap(aligned.numpy(), f.numpy())["mig"] > 0.9
    # a perfect but rotated linear encoding of the same factors into 84 dimensions: every factor in many dimensions
    mix = torch.randn(3, 84, generator=torch.Generator().manual_seed(2))
    mixed = (f.float() - f.float().mean(0)) / f.float().std(0) @ mix
    assert mutual_info_gap(mixed.numpy(), f.numpy())["mig"] < 0.3
    with pytest.raises(ValueError, match="at least 2"):
        mutual_info_gap(aligned[:, :1].numpy(), f.numpy())


def test_dci_importance_entropies_by_hand():
    from kbricks.methods.kf.analysis import dci_from_importance

    assert dci_from_importance(np.eye(3)) == pytest.approx({"dci_d": 1.0, "dci_c": 1.0})
    # one code carries every factor: disentanglement 0; each factor lives in one code: completeness 1
    assert dci_from_importance(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])) == pytest.approx({"dci_d": 0.0, "dci_c": 1.0})
    # two codes each carry one factor in halves: D = 1, C = 1 - log(2)/log(4) = 0.5
    r = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert dci_from_importance(r) == pytest.approx({"dci_d": 1.0, "dci_c": 0.5})


def test_dci_sap_and_probes_on_codes():
    from kbricks.methods.kf.analysis import dci, fit_probe, linear_probe, sap

    f = _factors(600)  # known-answer and reference DCI tests: tests/test_disentanglement_metrics.py
    ft = _factors(300, seed=5)
    one_hot = lambda fac: torch.cat([F.one_hot(fac[:, k]).float() for k in range(3)], 1)  # noqa: E731
    aligned_tr, aligned_te = one_hot(f), one_hot(ft)
    good = dci(aligned_tr, f, aligned_te, ft)
    assert good["dci_i"] > 0.99 and good["dci_d"] > 0.7
    noise = torch.randn(600, 17, generator=torch.Generator().manual_seed(3))
    bad = dci(noise, f, torch.randn(300, 17), ft)
    assert bad["dci_i"] < 0.4 and bad["dci_d"] < good["dci_d"]
    s_good = sap(f.float().numpy(), f.numpy(), ft.float().numpy(), ft.numpy())["sap"]
    s_bad = sap(noise.numpy(), f.numpy(), torch.randn(300, 17).numpy(), ft.numpy())["sap"]
    assert s_good > 0.7 and s_bad < 0.1  # 1 - chance of the second-best dimension: 0.78 here
    # the probe's L2 strength is chosen on a validation split of the training features: the test labels play no part
    probe = fit_probe(aligned_tr, f[:, 2])
    assert probe["weight_decay"] in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1) and probe["val_acc"] > 0.99
    assert linear_probe(aligned_tr, f[:, 2], aligned_te, ft[:, 2]) > 0.99
    assert fit_probe(aligned_tr, f[:, 2])["weight_decay"] == probe["weight_decay"]  # seeded split


def test_outputs_match_compares_tensors_including_uncovered_classes():
    from kbricks.methods.kf.report import outputs_match

    a = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert outputs_match(a, a.clone()) == 0.0
    assert outputs_match(a, a + torch.tensor([[0.5, 0.0, 0.0]])) == 0.5
    assert outputs_match(a, torch.tensor([[0.0, 2.0, 1.0]])) == float("inf")  # a class covered on one side only
    assert outputs_match([a, a], [a, a]) == 0.0 and outputs_match([a], [a[:, :2]]) == float("inf")


# ---- studies: variants, the selection rule, claims from raw results -------------------------------------------


def test_ablation_variants_and_selection_rule(tmp_path):
    from kbricks.studies.kf import ABLATIONS, ablation_variants, choose, configs_root

    v = ablation_variants("digits", configs_root() / "kf/digits.yaml")
    assert v["full"] == [] and "no_kd" in v and "official" in v
    # exactly one InfoMax variant and one bottleneck variant are the default, i.e. the full objective
    assert len({"infomax_teacher", "infomax_views"} & set(v)) == 1 and len({"bottleneck_batch"} & set(v)) == 1
    assert set(v) - {"full"} <= set(ABLATIONS)
    scores = {"default": [0.90, 0.91], "a": [0.907, 0.909], "b": [0.80, 0.82]}
    assert choose(scores, "default") == "default"  # within 0.5 points: a tie, and ties go to the default
    assert choose({**scores, "a": [0.93, 0.93]}, "default") == "a"


def _fake_report(tasks, teacher, kf, assembled, extra=None):
    r = {"tasks": tasks, "teacher/acc": teacher, "assembled/acc": assembled, "kf/acc": kf, "assembled_matches_factors": True,
         "assembled_max_abs_diff": 0.0, "kf/params": 100, "kd/params": 101, "teacher/params": 300, "kd/acc": kf - 0.01}
    for t in tasks:
        r[f"teacher/acc_{t}"], r[f"kf/acc_{t}"], r[f"kd/acc_{t}"] = teacher, kf, kf - 0.01
    r.update(extra or {})
    return r


def test_kf_claims_and_tables_from_raw_results(tmp_path):
    from kbricks.studies import evaluate_claims, write_reproduction, write_results
    from kbricks.studies.common import write_study

    runs = tmp_path / "runs"
    reps = [_fake_report(["a", "b"], 0.95, 0.949, 0.95), _fake_report(["a", "b"], 0.95, 0.935, 0.94)]
    write_study(runs / "kf/digits/study.json", {"summary": {"seeds": [0, 1], "minutes": 1.0, "metrics": {}}, "reports": reps})
    full = [_fake_report(["a", "b"], 0.95, 0.95, 0.95), _fake_report(["a", "b"], 0.95, 0.95, 0.95)]
    abl = {"full": full, "no_kd": [_fake_report(["a", "b"], 0.95, 0.9, 0.90), _fake_report(["a", "b"], 0.95, 0.96, 0.96)],
           "no_task_head": [_fake_report(["a", "b"], 0.95, 0.9, 0.90)] * 2,
           "kf_1task": [_fake_report(["all"], 0.95, 0.96, 0.96), _fake_report(["all"], 0.95, 0.97, 0.97)]}
    write_study(runs / "kf/digits/ablation/study.json",
                {"summary": {"seeds": [0, 1], "minutes": 2.0, "defaults": ["infomax_teacher", "bottleneck_vib"]}, "reports": abl})
    rows = {(r["area"], r["paper"]): r for r in evaluate_claims(runs)}
    factor = rows[("KF", "Each factor network performs on par with the teacher on its task (ECCV'22); issue bar: within 1 point, digits")]
    assert factor["verdict"] == "partly" and "0.80 ± 0.99" in factor["ours"]  # gaps 0.1 and 1.5 points: only the mean is within 1
    one = rows[("KF", "1-task factorization beats a KD student of the same size (the paper's CIFAR-10 headline, in small)")]
    assert one["verdict"] == "holds" and "96.50 ± 0.71" in one["ours"]
    by_paper = {r["paper"]: r for r in rows.values() if r["area"] == "KF ablation"}
    kd_row = next(r for p, r in by_paper.items() if "KD term off" in p and "digits" in p)
    assert kd_row["verdict"] == "partly" and "(full higher in 1/2 seeds)" in kd_row["ours"]
    head_row = next(r for p, r in by_paper.items() if "task-only head off" in p and "digits" in p)
    assert head_row["verdict"] == "holds"
    not_run = next(r for p, r in by_paper.items() if "bottleneck off" in p and "digits" in p)
    assert not_run["verdict"] == "not run"
    default = next(r for p, r in by_paper.items() if "InfoMax = official" in p and "digits" in p)
    assert default["verdict"] == "—" and "is the default" in default["ours"]
    md = write_reproduction(runs, tmp_path, quick=False).read_text()
    assert "### KF: IMB ablation, digits" in md and "| KD term off |" in md and "1-task KF (CKN + 1 TSN, 100 parameters)" in md
    assert "at least 60% of the seeds" in md  # the header states the SSKT rule the code applies
    assert "IMB ablation, digits" in write_results(runs, tmp_path / "res").read_text()

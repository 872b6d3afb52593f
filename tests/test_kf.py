import json
import math

import pytest
import torch
import torch.nn.functional as F

from kbricks import build_config
from kbricks.core.checkpoint import load_safetensors, save_safetensors
from kbricks.engine.experiment import build_experiment
from kbricks.engine.trainer import run_training
from kbricks.errors import CheckpointError
from kbricks.methods.kd import kd_loss
from kbricks.methods.kf import gaussian_kl, imb_loss, info_nce, merge_other
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
    views = (torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g))
    out = imb_loss(f, t, y, mu, lv, views, temperature=2.0, kd_weight=0.7, ce_weight=0.2, beta=0.01, infomax_weight=0.3, tau=0.5)
    for k in ("kd", "ce", "kl", "infonce"):
        assert torch.isfinite(out[k]) and out[k] > 0, k
    manual = 0.7 * out["kd"] + 0.2 * out["ce"] + 0.01 * out["kl"] + 0.3 * out["infonce"]
    assert out["loss"].item() == pytest.approx(manual.item(), rel=1e-6)
    off = imb_loss(f, t, [None, None], mu, lv, None, beta=0.0, infomax_weight=0.0)
    assert off["ce"] == 0 and off["infonce"] == 0 and off["loss"].item() == pytest.approx(off["kd"].item())
    zero_kl = imb_loss(f, t, y, [torch.zeros(8, 2)] * 2, [torch.zeros(8, 2)] * 2, None)
    assert zero_kl["kl"] == 0


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
    assert imb_loss(f, t, y, mu, lv, None, task_only_logits=a, task_weight=0.0)["task_only"] == 0


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


def test_kf_on_dsprites_latent_tasks_reports_mig_and_transfer(tmp_path):
    from kbricks.engine.evaluate import evaluate_run

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
    assert 0 <= r["kf/mig"] <= 1 and 0 <= r["kd/mig"] <= 1
    for feats in ("kf_ckn", "kd", "teacher"):
        for latent in ("orientation", "pos_x", "pos_y"):  # the latents that are not KF tasks
            assert 0 <= r[f"transfer/{feats}/{latent}"] <= 1
    assert r["assembled_matches_factors"] is True and "kf/acc_shape" in r


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

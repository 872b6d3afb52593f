"""The growing brick library: kf_extend (new TSN bricks on a frozen CKN brick) and kf_amalgamate (several teachers,
one CKN), through the Python API and the CLI, on tiny digits runs."""

import hashlib

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import kbricks
from kbricks import build_config
from kbricks.cli import main
from kbricks.data import load_dataset
from kbricks.engine.run import run_training
from kbricks.errors import ConfigError
from kbricks.methods.kf.amalgamate import LOG_FLOOR, gated_targets
from kbricks.methods.kf.bricks import BrickMismatchError, assemble, load_brick
from kbricks.methods.kf.method import merge_other

FAST = {"optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}, "train": {"epochs": 2, "batch_size": 32, "progress": "off", "plots": False}}
CKN = {"name": "small_cnn", "kwargs": {"widths": [4, 8]}}  # BatchNorm inside: its running statistics must stay put
TSN = {"name": "mlp", "kwargs": {"hidden": [16]}}
LOW, HIGH = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """A digits teacher and a KF run of it on classes 0-4 only (one task)."""
    d = tmp_path_factory.mktemp("lib")
    base = {"seed": 0, "data": {"name": "digits", "train_subset": 256}, "model": CKN, **FAST}
    run_training(build_config({**base, "name": "teacher", "train": {**FAST["train"], "epochs": 4}}), d / "teacher")
    kf = {**base, "name": "kf", "data": {**base["data"], "tasks": {"partition": [LOW]}},
          "method": {"name": "kf", "teacher": str(d / "teacher"), "tsn": TSN, "tsn_dim": 4}}
    run_training(build_config(kf), d / "kf")
    return d


def _extend(lib, run_dir, **kw):
    return kbricks.extend(lib / "kf/bricks/ckn.json", lib / "teacher", "digits", tasks=[HIGH], tsn=TSN, options={"tsn_dim": 4},
                          epochs=2, batch_size=32, optimizer="adam", lr=0.01, weight_decay=0.0, overrides=["data.train_subset=256"],
                          run_dir=run_dir, progress="off", **kw)


@pytest.fixture(scope="module")
def extended(lib):
    ckn = lib / "kf/bricks/ckn.json"
    hashes = sha(ckn), sha(lib / "kf/bricks/ckn.safetensors")
    ext = _extend(lib, lib / "ext")
    return ext, hashes


def test_extend_keeps_the_ckn_bit_identical(lib, extended):
    ext, hashes = extended
    assert (sha(lib / "kf/bricks/ckn.json"), sha(lib / "kf/bricks/ckn.safetensors")) == hashes  # the brick file is untouched
    _, tensors = load_brick(lib / "kf/bricks/ckn.json")
    state = ext.method.factors.ckn.state_dict()
    assert set(state) == set(tensors) and any("running_mean" in k for k in state)
    for k, v in tensors.items():  # weights and BatchNorm statistics, after two epochs of training the new TSN
        assert torch.equal(state[k], v), k
    assert not any(p.requires_grad for p in ext.method.factors.ckn.parameters())
    # the run directory holds a byte copy of the CKN brick next to its new TSN brick
    assert sha(ext.run_dir / "bricks/ckn.safetensors") == hashes[1]
    assert sorted(p.name for p in (ext.run_dir / "bricks").glob("*.json")) == ["ckn.json", "tsn-classes_5-6-7-8-9.json"]


def test_extended_brick_binds_to_the_ckn_and_assembles_with_the_old_ones(lib, extended):
    ext, _ = extended
    ckn_manifest, _ = load_brick(lib / "kf/bricks/ckn.json")
    new, _ = load_brick(ext.bricks["classes_5-6-7-8-9"])
    assert new["ckn_fingerprint"] == ckn_manifest["fingerprint"] and new["normalize"] == ckn_manifest["normalize"]
    assert new["provenance"]["method"] == "kf_extend" and new["provenance"]["teacher"]["classes"] == list(range(10))
    old = lib / "kf/bricks/tsn-classes_0-1-2-3-4.json"
    net = assemble(lib / "kf/bricks/ckn.json", [old, ext.bricks["classes_5-6-7-8-9"]])
    assert net.classes == list(range(10))
    raw = load_dataset("digits").test.x[:50]
    # each factor's output in the assembled network == the factor network that trained it (old run / extension run)
    from kbricks.engine.evaluate import load_run

    exp, _ = load_run(lib / "kf")
    exp.method.eval()
    with torch.no_grad():
        outs = net.factor_outputs(raw)
        assert torch.equal(outs[0], exp.method.factors(exp.transform(raw, train=False))[0])
        assert torch.equal(outs[1], ext.method.factors(ext.normalize(raw))[0])
        scores = net(raw)
        t = net.temperatures
        assert torch.allclose(scores[:, :5], F.log_softmax(outs[0] / t[0], 1)[:, :5])
        assert torch.allclose(scores[:, 5:], F.log_softmax(outs[1] / t[1], 1)[:, :5])


def test_bricks_of_another_ckn_are_refused(lib, extended, tmp_path):
    ext, _ = extended
    other = _extend(lib, tmp_path / "other-kf", seed=1)  # same CKN: assembles
    assemble(lib / "kf/bricks/ckn.json", [other.bricks["classes_5-6-7-8-9"]])
    run_training(build_config({"name": "kf2", "seed": 1, "data": {"name": "digits", "train_subset": 256, "tasks": {"split": 2}}, "model": CKN,
                               "method": {"name": "kf", "teacher": str(lib / "teacher"), "tsn": TSN, "tsn_dim": 4}, **FAST}), tmp_path / "kf2")
    with pytest.raises(BrickMismatchError, match="bricks only assemble with the CKN they were factorized with"):
        assemble(lib / "kf/bricks/ckn.json", [lib / "kf/bricks/tsn-classes_0-1-2-3-4.json", tmp_path / "kf2/bricks/tsn-classes_5-6-7-8-9.json"])
    with pytest.raises(BrickMismatchError, match="not with the given CKN"):  # the extension's brick on the other run's CKN
        assemble(tmp_path / "kf2/bricks/ckn.json", [ext.bricks["classes_5-6-7-8-9"]])


def test_extend_refuses_data_of_only_the_new_classes(lib, tmp_path):
    splits = load_dataset("digits")
    keep = splits.train.y >= 5
    x, y = splits.train.x[keep][:128], splits.train.y[keep][:128]
    with pytest.raises(ConfigError) as e:
        kbricks.extend(lib / "kf/bricks/ckn.json", lib / "teacher", (x, y), tasks=[HIGH], run_dir=tmp_path / "r", progress="off")
    assert "only the new classes [5, 6, 7, 8, 9]" in str(e.value) and "do not relabel" in str(e.value)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_extend_from_the_cli(lib, tmp_path):
    cfg = {"name": "ext", "seed": 0, "data": {"name": "digits", "train_subset": 256, "tasks": {"partition": [HIGH]}}, "model": CKN,
           "method": {"name": "kf_extend", "ckn": str(lib / "kf/bricks/ckn.json"), "teacher": str(lib / "teacher"), "tsn": TSN, "tsn_dim": 4},
           **FAST}
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "ext.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    net = assemble(lib / "kf/bricks/ckn.json", [lib / "kf/bricks/tsn-classes_0-1-2-3-4.json", tmp_path / "run/bricks/tsn-classes_5-6-7-8-9.json"])
    assert net.classes == list(range(10))
    # the model must be the CKN brick's architecture, said in one line
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "model": {"name": "small_cnn", "kwargs": {"widths": [8, 8]}}}))
    with pytest.raises(ConfigError, match=r"model must be the CKN brick's architecture: set model: \{name: small_cnn, kwargs: \{'widths': \[4, 8\]\}\}"):
        run_training(kbricks.load_config(tmp_path / "bad.yaml"), tmp_path / "bad")
    # InfoMax trains the CKN: asking for it on a frozen one is refused
    (tmp_path / "im.yaml").write_text(yaml.safe_dump({**cfg, "method": {**cfg["method"], "infomax_weight": 1.0}}))
    with pytest.raises(ConfigError, match="the CKN brick is frozen"):
        run_training(kbricks.load_config(tmp_path / "im.yaml"), tmp_path / "im")


def test_gated_targets_are_kf_targets_for_a_full_teacher_and_other_outside():
    torch.manual_seed(0)
    logits, t = torch.randn(6, 10), 4.0
    everyone = torch.ones(6, dtype=torch.bool)
    got = gated_targets(logits, everyone, LOW, HIGH, t, other=True)
    assert torch.allclose(F.softmax(got / t, 1), F.softmax(merge_other(logits, LOW, t) / t, 1), atol=1e-6)
    # a 5-class teacher: inside its label space, its tempered softmax (no 'other' mass); outside, everything on 'other'
    five = logits[:, :5]
    member = torch.tensor([True, False, True, False, True, False])
    p = F.softmax(gated_targets(five, member, range(5), [], t, other=True) / t, 1)
    assert torch.allclose(p[member, :5], F.softmax(five[member] / t, 1), atol=1e-6)
    assert torch.allclose(p[~member, 5], torch.ones(3)) and (p[~member, :5] <= torch.exp(torch.tensor(LOG_FLOOR)) * 2).all()


class Slice(nn.Module):
    """A teacher of some classes: the full teacher's logits of those classes."""

    def __init__(self, net, classes):
        super().__init__()
        self.net, self.classes = net, list(classes)

    def forward(self, x):
        return self.net(x)[:, self.classes]


def test_amalgamate_two_teachers_from_python(lib, tmp_path):
    full = kbricks.load_model(lib / "teacher")  # takes raw inputs, as the data are passed
    d = load_dataset("digits")
    am = kbricks.factorize(teachers=[{"teacher": Slice(full, LOW), "classes": LOW, "name": "low"}, (Slice(full, HIGH), HIGH)],
                           data=(d.train.x[:256], d.train.y[:256]), test=(d.test.x, d.test.y), ckn=CKN, tsn=TSN, options={"tsn_dim": 4},
                           epochs=2, batch_size=32, optimizer="adam", lr=0.01, weight_decay=0.0, run_dir=tmp_path / "am", progress="off")
    assert sorted(am.bricks) == ["ckn", "classes_0-1-2-3-4", "classes_5-6-7-8-9"]
    low, _ = load_brick(am.bricks["classes_0-1-2-3-4"])
    assert low["provenance"]["teacher"]["name"] == "low" and low["provenance"]["teacher"]["classes"] == LOW
    assert load_brick(am.bricks["classes_5-6-7-8-9"])[0]["provenance"]["teacher"]["name"] == "teacher1"
    net = am.assemble()
    raw = d.test.x[:40]
    with torch.no_grad():
        for a, b in zip(net.factor_outputs(raw), am.method.factors(am.normalize(raw))):
            assert torch.equal(a, b)
        assert torch.equal(net(raw), am.predict(raw))
    assert net.classes == list(range(10))
    # a teacher entry must say which classes its outputs are, with several teachers
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.classes: list the global class id"):
        kbricks.factorize(teachers=[(Slice(full, LOW), LOW), {"teacher": Slice(full, HIGH)}], data=(d.train.x[:64], d.train.y[:64]),
                          epochs=1, run_dir=tmp_path / "bad", progress="off")
    with pytest.raises(ConfigError, match="lists 4 classes but the teacher has 5 outputs"):
        kbricks.factorize(teachers=[(Slice(full, LOW), LOW[:4]), (Slice(full, HIGH), HIGH)], data=(d.train.x[:64], d.train.y[:64]),
                          epochs=1, run_dir=tmp_path / "bad2", progress="off")


def test_amalgamate_overlapping_teachers_from_the_cli(lib, tmp_path):
    """Two teachers of overlapping label spaces (both know all ten classes): each distils the task it is given."""
    cfg = {"name": "am", "seed": 0, "data": {"name": "digits", "train_subset": 256}, "model": CKN,
           "method": {"name": "kf_amalgamate", "tsn": TSN, "tsn_dim": 4,
                      "teachers": [{"path": str(lib / "teacher"), "tasks": [LOW]}, {"path": str(lib / "teacher"), "tasks": [HIGH]}]},
           **FAST}
    (tmp_path / "am.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"teachers\[0\]\.classes"):  # several teachers: their classes must be stated
        run_training(kbricks.load_config(tmp_path / "am.yaml"), tmp_path / "bad")
    for e in cfg["method"]["teachers"]:
        e["classes"] = list(range(10))
    (tmp_path / "am.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "am.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    bricks = tmp_path / "run/bricks"
    net = assemble(bricks / "ckn.json", [bricks / "tsn-classes_0-1-2-3-4.json", bricks / "tsn-classes_5-6-7-8-9.json"])
    assert net.classes == list(range(10))
    # a brick of the amalgamation does not assemble with the KF run's CKN
    with pytest.raises(BrickMismatchError, match="bricks only assemble with the CKN"):
        assemble(lib / "kf/bricks/ckn.json", [bricks / "tsn-classes_5-6-7-8-9.json"])


def test_library_claims_follow_their_rules(tmp_path):
    from kbricks.studies.claims import evaluate_claims
    from kbricks.studies.common import write_study
    from kbricks.studies.library import amalgamation_claim, ckn_unchanged_claim, extend_claim

    rep = {"teacher/acc": 0.98, "joint/acc": 0.97, "extend/acc": 0.965, "ckn_files_unchanged": True, "ckn_tensors_equal": True,
           "teacher_low/acc": 0.99, "teacher_high/acc": 0.99, "amal/acc_low": 0.985, "amal/acc_high": 0.97, "amal/acc": 0.975,
           "kd/acc": 0.97, "amal/params": 100, "kd/params": 102}
    write_study(tmp_path / "library/digits/study.json", {"summary": {"minutes": 1.0}, "reports": [rep, {**rep, "extend/acc": 0.958}]})
    assert extend_claim("digits")(tmp_path)[0] == "partly"  # -0.5 and -1.2 points: within 1 point on the mean only
    assert amalgamation_claim("digits")(tmp_path)[0] == "does not hold"  # {5-9}: -2 points in every seed
    assert ckn_unchanged_claim(tmp_path)[0] == "holds"
    assert extend_claim("mnist5k")(tmp_path) is None
    rows = [r["verdict"] for r in evaluate_claims(tmp_path) if r["area"] == "KF library"]
    assert rows == ["partly", "not run", "holds", "does not hold", "not run", "holds", "not run"]

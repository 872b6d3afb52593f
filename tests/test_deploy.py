"""Deployable output: networks that take raw inputs (their normalisation inside), loaders that rebuild them from
their files and check fingerprints, and torch.export / TorchScript / ONNX exports that match eager PyTorch to 1e-5."""

import json
import os
import shutil

import pytest
import torch
from torch import nn

import kbricks
from kbricks import build_config
from kbricks.config import DataConfig
from kbricks.core.checkpoint import load_checkpoint, load_safetensors, save_safetensors
from kbricks.data import normalize
from kbricks.engine.experiment import build_experiment, load_data
from kbricks.engine.export import max_abs_difference, read_export_metadata
from kbricks.engine.run import run_training
from kbricks.errors import CheckpointError, KbricksError
from kbricks.models.deploy import InputNormalization
from kbricks.models.frozen import load_frozen

RUN = {"optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}, "train": {"batch_size": 64, "progress": "off", "plots": False}}
DIGITS = {**RUN, "data": {"name": "digits", "train_subset": 512}}
SUFFIX = {"export": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}
DSPRITES = {**RUN, "data": {"name": "dsprites", "kwargs": {"n_samples": 400, "image_size": 16, "num_orientations": 4, "num_positions": 4},
                            "tasks": {"latents": ["shape", "scale"]}}}
TSN = {"tsn": {"name": "mlp", "kwargs": {"hidden": [16]}}, "tsn_dim": 4}
CKN = {"name": "mlp", "kwargs": {"hidden": [32]}}  # digits: MLPs keep the suite fast; dSprites below exports a CNN


def _train(base, out, model, epochs, method=None):
    cfg = dict(base, model=model, **({"method": method} if method else {}))
    return run_training(build_config(cfg, [f"train.epochs={epochs}"]), out)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A digits teacher, its KF run (two class-partition bricks) and the raw test split."""
    root = tmp_path_factory.mktemp("deploy-digits")
    _train(DIGITS, root / "teacher", {"name": "mlp", "kwargs": {"hidden": [64]}}, 6)
    kf_method = {"name": "kf", "teacher": str(root / "teacher"), **TSN}
    summary = _train({**DIGITS, "data": {**DIGITS["data"], "tasks": {"split": 2}}}, root / "kf", CKN, 8, kf_method)
    test = load_data(DataConfig.model_validate(DIGITS["data"])).test
    return root, summary, test


def _bricks(root, *which):
    b = root / "kf" / "bricks"
    return b / "ckn.json", [b / f"tsn-classes_{w}.json" for w in which]


def _acc(scores, y):
    return (scores.argmax(1) == y).sum().item() / len(y)


def test_input_normalization_matches_the_pipeline_for_images_and_vectors():
    x = torch.rand(5, 3, 4, 4)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    assert torch.equal(InputNormalization(mean, std)(x), normalize(x, mean, std))
    v = torch.rand(6, 3)  # feature vectors [N, D]: one statistic per feature
    assert torch.allclose(InputNormalization(mean, std)(v), (v - torch.tensor(mean)) / torch.tensor(std))
    assert torch.allclose(InputNormalization([0.5], [2.0])(v), (v - 0.5) / 2.0)  # one statistic for every entry
    with pytest.raises(CheckpointError, match="as many means as stds"):
        InputNormalization([0.1, 0.2], [1.0])


def test_assembled_network_on_raw_inputs_scores_what_the_factors_and_teacher_pipeline_score(digits):
    root, summary, test = digits
    ckn, tsns = _bricks(root, "0-1-2-3-4", "5-6-7-8-9")
    net = kbricks.assemble(ckn, tsns)
    with torch.no_grad():
        scores = net(test.x)  # raw images in [0, 1]
    acc = _acc(scores, test.y)
    assert acc == pytest.approx(summary["final"]["test/acc"], abs=1e-9)  # the KF run's own evaluation, normalised inputs
    # the trained factors fed the pipeline's normalised inputs give the same scores, bit for bit
    exp = build_experiment(build_config({**DIGITS, "data": {**DIGITS["data"], "tasks": {"split": 2}},
                                         "model": CKN,
                                         "method": {"name": "kf", "teacher": str(root / "teacher"), **TSN}}))
    exp.method.load_state_dict(load_checkpoint(root / "kf/ckpt/last.pt")["model"])
    with torch.no_grad():
        assert torch.equal(scores, exp.method.eval().predict(exp.transform(test.x, train=False)))
        teacher = load_frozen(root / "teacher")(test.x)  # the teacher's own pipeline on the same raw images
    teacher_acc = _acc(teacher, test.y)
    assert teacher_acc > 0.85 and acc > 0.75 and abs(acc - teacher_acc) < 0.15  # tiny budgets; the study measures the gap
    info = net.info
    assert info["input"]["shape"] == [1, 8, 8] and info["outputs"] == ["scores"]
    assert info["input"]["normalize"] == {"mean": pytest.approx(exp.transform.mean), "std": pytest.approx(exp.transform.std)}
    assert info["class_names"] == [str(c) for c in range(10)]


def test_load_assembled_from_its_two_files_alone_and_refuse_tampering(digits, tmp_path, capsys):
    root, _, test = digits
    net = kbricks.assemble(*_bricks(root, "5-6-7-8-9"))
    kbricks.save_assembled(net, tmp_path / "asm")
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    for f in ("assembled.json", "assembled.safetensors"):  # no brick files next to it
        shutil.copy(tmp_path / "asm" / f, alone / f)
    loaded = kbricks.load_assembled(alone)
    with torch.no_grad():
        assert torch.equal(loaded(test.x), net(test.x))
    assert loaded.classes == [5, 6, 7, 8, 9] and loaded.temperatures == net.temperatures
    assert loaded.info["fingerprint"] == json.loads((alone / "assembled.json").read_text())["fingerprint"]
    assert isinstance(kbricks.load_assembled(alone / "assembled.json"), type(net))

    manifest = json.loads((alone / "assembled.json").read_text())
    tensors = load_safetensors(alone / "assembled.safetensors")
    bad = tmp_path / "bad"

    def write(m, t):
        bad.mkdir(exist_ok=True)
        (bad / "assembled.json").write_text(json.dumps(m))
        save_safetensors(t, bad / "assembled.safetensors")

    edited = {k: v + 1 if k == "tsns.0.head.bias" else v for k, v in tensors.items()}
    write(manifest, edited)
    with pytest.raises(CheckpointError, match="assembled.safetensors does not match the manifest fingerprint"):
        kbricks.load_assembled(bad)
    for field, value in (("input", dict(manifest["input"], normalize={"mean": [0.0], "std": [1.0]})),
                         ("tsns", [dict(manifest["tsns"][0], temperature=1.0)])):
        write(dict(manifest, **{field: value}), tensors)
        with pytest.raises(CheckpointError, match="manifest was modified after it was written"):
            kbricks.load_assembled(bad)
    # weights edited and the top-level fingerprints recomputed: the brick's own fingerprint still catches it
    from kbricks.core.checkpoint import fingerprint
    from kbricks.methods.kf.bricks import _assembled_signature

    resigned = dict(manifest, weights_fingerprint=fingerprint(edited))
    resigned["fingerprint"] = _assembled_signature(resigned)
    write(resigned, edited)
    with pytest.raises(CheckpointError, match="tsn #1 of assembled.json: weights do not match the manifest fingerprint"):
        kbricks.load_assembled(bad)
    write(dict(manifest, format="kbricks-assembled-v1"), tensors)
    with pytest.raises(CheckpointError, match="assemble the bricks again"):
        kbricks.load_assembled(bad)
    with pytest.raises(CheckpointError, match="no assembled network"):
        kbricks.load_assembled(tmp_path / "nothing")
    from kbricks.cli import main

    write(dict(manifest, classes=[5, 6]), tensors)
    assert main(["export", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kbricks: error: ") and "modified after it was written" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_load_model_takes_raw_inputs_and_checks_its_fingerprint(digits, tmp_path):
    root, _, test = digits
    student = kbricks.load_model(root / "teacher")
    with torch.no_grad():
        logits = student(test.x)
    results = json.loads((root / "teacher/results.json").read_text())
    assert _acc(logits, test.y) == pytest.approx(results["final"]["test/acc"], abs=1e-9)
    assert student.info["input"]["shape"] == [1, 8, 8] and not student.training
    shutil.copytree(root / "teacher", tmp_path / "t", ignore=shutil.ignore_patterns("ckpt", "plots"))
    t = load_safetensors(tmp_path / "t/model.safetensors")
    save_safetensors({k: v * 1.01 if v.is_floating_point() else v for k, v in t.items()}, tmp_path / "t/model.safetensors")
    with pytest.raises(CheckpointError, match="does not match the fingerprint in model.json"):
        kbricks.load_model(tmp_path / "t")
    with pytest.raises(CheckpointError, match="load its bricks instead"):
        kbricks.load_model(root / "kf")


def _check_file(fmt, path, net, x):
    """Run an exported file independently of kbricks.export; compare with eager PyTorch."""
    with torch.no_grad():
        eager = net(x)
    if fmt == "export":
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(x)
    elif fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(path))(x)
    else:
        import onnxruntime as ort

        got = [torch.from_numpy(o) for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})]
    assert max_abs_difference(eager, got) <= 1e-5
    return eager, got


def _needs(fmt):
    if fmt == "onnx":  # the optional extra kbricks[onnx]: skipped only where it is not installed
        for mod in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(mod)


@pytest.mark.parametrize("fmt", ["export", "torchscript", "onnx"])
def test_class_union_exports_match_eager(digits, tmp_path, fmt):
    _needs(fmt)
    root, _, test = digits
    suffix = SUFFIX[fmt]
    for which in (("0-1-2-3-4", "5-6-7-8-9"), ("5-6-7-8-9",)):  # the union of all classes; one brick (-inf elsewhere)
        net = kbricks.assemble(*_bricks(root, *which))
        out = tmp_path / f"asm-{len(which)}{suffix}"
        r = kbricks.export(net, out, format=fmt)
        assert r["max_abs_diff"] <= 1e-5 and r["outputs"] == ["scores"] and r["checked_batch_sizes"] == [2, 1, 5]
        assert r["how"] == {"export": "torch.export, dynamic batch", "torchscript": "script", "onnx": "onnx opset 18"}[fmt]
        eager, got = _check_file(fmt, out, net, test.x)  # the whole raw test split, another batch size
        got = got[0] if isinstance(got, list) else got
        assert torch.equal(eager.argmax(1), got.argmax(1))
        assert torch.isinf(got[:, :5]).all() == (len(which) == 1)
        meta = read_export_metadata(out)
        assert meta["kind"] == "assembled" and meta["input"]["shape"] == [1, 8, 8] and meta["input"]["normalize"]["mean"]
        assert meta["classes"] == net.classes


@pytest.mark.parametrize("fmt", ["export", "torchscript", "onnx"])
def test_student_exports_match_eager(digits, tmp_path, fmt):
    _needs(fmt)
    root, _, test = digits
    out = tmp_path / f"student{SUFFIX[fmt]}"
    r = kbricks.export(root / "teacher", out, format=fmt)  # a run directory is loaded with load_model
    assert r["outputs"] == ["logits"] and r["max_abs_diff"] <= 1e-5
    _check_file(fmt, out, kbricks.load_model(root / "teacher"), test.x)
    assert read_export_metadata(out)["fingerprint"] == json.loads((root / "teacher/model.json").read_text())["fingerprint"]


@pytest.fixture(scope="module")
def dsprites_assembly(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-dsprites")
    cnn = {"name": "small_cnn", "kwargs": {"widths": [8, 16]}}
    _train({**DSPRITES, "data": {**DSPRITES["data"], "tasks": {"latents": ["shape", "scale", "orientation"]}}}, root / "t", cnn, 1)
    _train(DSPRITES, root / "kf", cnn, 1, {"name": "kf", "teacher": str(root / "t"), **TSN})
    b = root / "kf/bricks"
    net = kbricks.assemble(b / "ckn.json", [b / "tsn-shape.json", b / "tsn-scale.json"])
    kbricks.save_assembled(net, root / "asm")
    return root, net


@pytest.mark.parametrize("fmt", ["export", "torchscript", "onnx"])
def test_latent_task_exports_match_eager(dsprites_assembly, tmp_path, fmt):
    """Assembled latent-task bricks (a CNN CKN) and a multi-head CNN student: one output per task."""
    _needs(fmt)
    root, net = dsprites_assembly
    x = load_data(DataConfig.model_validate(DSPRITES["data"])).test.x[:50]
    suffix = SUFFIX[fmt]
    r = kbricks.export(root / "asm", tmp_path / f"latent{suffix}", format=fmt)  # from assembled.json + .safetensors
    assert r["outputs"] == ["logits_shape", "logits_scale"] and r["max_abs_diff"] <= 1e-5
    eager, got = _check_file(fmt, tmp_path / f"latent{suffix}", net, x)
    assert [o.shape for o in eager] == [torch.Size([50, 3]), torch.Size([50, 6])] and len(got) == 2
    r = kbricks.export(root / "t", tmp_path / f"teacher{suffix}", format=fmt)
    assert r["outputs"] == ["logits_shape", "logits_scale", "logits_orientation"] and r["max_abs_diff"] <= 1e-5
    eager, got = _check_file(fmt, tmp_path / f"teacher{suffix}", kbricks.load_model(root / "t"), x)
    assert len(got) == 3


class _Unscriptable(nn.Module):
    """A user module TorchScript cannot compile (a Python lambda) whose branch depends on the data."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.f = lambda h: h * 2 if bool(h.mean() > 0.5) else h - 1

    def forward(self, x):
        return self.lin(self.f(x))


def test_export_traces_what_script_cannot_compile_and_refuses_a_wrong_trace(tmp_path, monkeypatch):
    net = _Unscriptable().train()
    ones, zeros = torch.ones(3, 4), torch.zeros(2, 4)
    r = kbricks.export(net, tmp_path / "ok.pt", example_input=ones, check_inputs=[torch.ones(5, 4)])
    assert r["how"].startswith("trace; torch.jit.script failed") and r["max_abs_diff"] <= 1e-5
    assert net.training  # exported in eval mode, handed back in the mode it came in
    # traced on one branch, checked on the other: refused, nothing written
    with pytest.raises(KbricksError, match=r"differs from the PyTorch network by .* nothing was written"):
        kbricks.export(net, tmp_path / "wrong.pt", example_input=ones, check_inputs=[zeros])
    assert not (tmp_path / "wrong.pt").exists() and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(KbricksError, match="torch.jit.script cannot compile"):
        kbricks.export(net, tmp_path / "s.pt", example_input=ones, torchscript="script")
    with pytest.raises(KbricksError, match="unknown export format 'tflite'"):
        kbricks.export(net, tmp_path / "x", format="tflite", example_input=ones)
    with pytest.raises(KbricksError, match="does not record its input shape"):
        kbricks.export(net, tmp_path / "x.pt")
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # the extra not installed
    with pytest.raises(KbricksError, match=r"pip install 'kbricks\[onnx\]'"):
        kbricks.export(net, tmp_path / "x.onnx", format="onnx", example_input=ones)


def test_export_cli(digits, tmp_path, capsys):
    from kbricks.cli import main

    root, _, _ = digits
    kbricks.save_assembled(kbricks.assemble(*_bricks(root, "0-1-2-3-4", "5-6-7-8-9")), tmp_path / "asm")
    assert main(["export", str(tmp_path / "asm"), "--out", str(tmp_path / "asm.pt"), "--batch", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["format"] == "torchscript" and r["checked_batch_sizes"] == [3, 1, 6] and (tmp_path / "asm.pt").exists()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y.pt")]) == 2
    assert "no deployable network" in capsys.readouterr().err


def test_export_cli_never_replaces_a_file_unasked_and_writes_atomically(digits, tmp_path, capsys):
    from kbricks.cli import main

    root, _, _ = digits
    out = tmp_path / "kd.pt2"
    assert main(["export", str(root / "teacher"), "--out", str(out)]) == 0  # the format follows the suffix
    r = json.loads(capsys.readouterr().out)
    assert r["format"] == "export" and r["how"] == "torch.export, dynamic batch" and r["max_abs_diff"] <= 1e-5
    before = out.read_bytes()
    assert main(["export", str(root / "teacher"), "--out", str(out), "--batch", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kbricks: error: {str(out)!r} already exists; refusing to replace it (add --overwrite, or overwrite=True in Python)"
    assert out.read_bytes() == before
    with pytest.raises(KbricksError, match="already exists; refusing to replace it"):
        kbricks.export(root / "teacher", out)
    assert main(["export", str(root / "teacher"), "--out", str(out), "--batch", "4", "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["checked_batch_sizes"] == [4, 1, 7] and out.read_bytes() != before
    assert main(["export", str(root / "teacher"), "--out", str(tmp_path / "kd.bin")]) == 2
    assert "cannot tell the export format from the name 'kd.bin'" in capsys.readouterr().err
    assert main(["export", str(root / "teacher"), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["export", str(root / "teacher"), "--out", str(tmp_path / "a-file" / "kd.pt2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the export's directory" in err[0] and "a-file" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "kd.pt2"]  # no temporary file left behind


def test_export_to_a_read_only_directory_is_one_line(tmp_path, capsys):
    from kbricks.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        assert main(["export", str(tmp_path), "--out", str(locked / "kd.pt2")]) == 2  # refused before the source is read
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the export's directory" in err[0] and "is not writable" in err[0]
    finally:
        locked.chmod(0o700)


def test_a_failed_check_or_interrupt_leaves_no_file(tmp_path, monkeypatch):
    import kbricks.engine.export as ex

    net = nn.Sequential(nn.Linear(4, 3))
    x = torch.rand(2, 4)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "_run_back", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kbricks.export(net, tmp_path / "n.pt2", example_input=x)
    assert list(tmp_path.iterdir()) == []

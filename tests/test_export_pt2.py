"""torch.export programs (.pt2): the export format (round trip equal to eager, dynamic or fixed batch, metadata), a
.pt2 file as a KD teacher through ``kbricks train``, archives refused before torch would unpickle anything, and no
TorchScript deprecation warning for a user who did not ask for TorchScript."""

import contextlib
import io
import json
import os
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import kbricks
from kbricks import build_config
from kbricks.cli import main
from kbricks.engine.experiment import build_experiment, load_config
from kbricks.engine.export import max_abs_difference, read_export_metadata
from kbricks.engine.run import run_training
from kbricks.errors import CheckpointError, ConfigError, KbricksError
from kbricks.models.exported import ExportedNetwork, _check_operators, load_program
from kbricks.models.frozen import load_frozen
from kbricks.models.spec import as_spec, path_kind

DIGITS = {"data": {"name": "digits", "train_subset": 256}, "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
          "train": {"batch_size": 64, "progress": "off", "plots": False}}
CNN = {"name": "small_cnn", "kwargs": {"widths": [8, 16]}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny trained digits CNN teacher, exported to .pt2 (raw inputs: its normalisation is inside)."""
    root = tmp_path_factory.mktemp("pt2")
    run_training(build_config(dict(DIGITS, model=CNN), ["train.epochs=1"]), root / "teacher")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of any kind on the torch.export path
        r = kbricks.export(root / "teacher", root / "t.pt2")
    return root, r


def _raw(n=64):
    from kbricks.config import DataConfig
    from kbricks.engine.experiment import load_data

    return load_data(DataConfig.model_validate(DIGITS["data"])).test.x[:n]


def test_pt2_export_round_trip_equals_eager_at_every_batch_size(teacher):
    root, r = teacher
    assert r["format"] == "export" and r["how"] == "torch.export, dynamic batch" and r["outputs"] == ["logits"]
    assert r["max_abs_diff"] <= 1e-5 and r["checked_batch_sizes"] == [2, 1, 5]
    eager = kbricks.load_model(root / "teacher")
    program = torch.export.load(str(root / "t.pt2")).module()  # plain torch, no kbricks
    for n in (1, 3, 64):
        x = _raw(n)
        with torch.no_grad():
            assert max_abs_difference(eager(x), program(x)) <= 1e-5
    meta = read_export_metadata(root / "t.pt2")
    card = json.loads((root / "teacher/model.json").read_text())
    assert meta["batch"] == "dynamic" and meta["outputs"] == ["logits"] and meta["fingerprint"] == card["fingerprint"]
    assert meta["input"]["shape"] == [1, 8, 8] and meta["input"]["normalize"]["mean"] == pytest.approx(card["normalize"]["mean"])


def test_pt2_teacher_through_kbricks_train_gives_the_eager_teachers_outputs(teacher, tmp_path, capsys):
    root, _ = teacher
    cfg = {**DIGITS, "data": {"name": "digits", "train_subset": 128}, "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
           "method": {"name": "kd", "teacher": {"path": str(root / "t.pt2"), "normalize": "none"}, "temperature": 4.0, "alpha": 0.9},
           "train": {**DIGITS["train"], "epochs": 1}}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # nobody asked for TorchScript
        assert main(["train", str(tmp_path / "kd.yaml"), "--run-dir", str(tmp_path / "kd")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0.0 <= summary["final"]["test/acc"] <= 1.0
    # the teacher the KD run used, fed the method's normalised inputs, predicts what the eager teacher predicts on raw ones
    exp = build_experiment(load_config(tmp_path / "kd/config.yaml"))
    frozen = exp.method.teacher
    assert isinstance(frozen.net, ExportedNetwork) and not frozen.net.training
    assert all(not p.requires_grad for p in frozen.parameters())
    x = _raw()
    with torch.no_grad():
        eager, used = kbricks.load_model(root / "teacher")(x), frozen(exp.transform(x, train=False))
    diff = max_abs_difference(eager, used)
    print(f"pt2 teacher in a KD run vs eager: max abs diff {diff:.3g}")
    assert diff <= 1e-5, diff
    assert torch.equal(eager.argmax(1), used.argmax(1))
    frozen.train()  # the trainer switches modules to train mode: the exported graph is not asked to
    assert not frozen.training


def test_pt2_spec_needs_its_input_convention_and_takes_no_kwargs(teacher):
    root, _ = teacher
    pt2 = str(root / "t.pt2")
    assert path_kind(pt2) == "exported"
    with pytest.raises(ConfigError, match=r"is a torch.export file: state its input convention with normalize: none"):
        as_spec(pt2, "method.teacher")
    with pytest.raises(ConfigError, match="a torch.export file takes no kwargs|kwargs and weights go with an import path"):
        load_frozen({"path": pt2, "normalize": "none", "kwargs": {"a": 1}}, where="method.teacher")
    net = load_frozen({"path": pt2, "normalize": "none"}, example=_raw(2), where="method.teacher")
    with torch.no_grad():
        assert torch.equal(net(_raw(8)), kbricks.load_model(root / "teacher")(_raw(8)))  # raw in, raw in: bit for bit


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a .pt2 archive with some records changed (``change(name, bytes)`` -> bytes, or None to drop it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


class _Touch:
    """A pickle that creates a file when it is unpickled: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_archives_torch_would_unpickle_or_run_are_refused_before_loading(teacher, tmp_path):
    root, _ = teacher
    src = root / "t.pt2"
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save(_Touch(marker), buffer)  # what torch.export.save writes for a pickled entry
    payload = buffer.getvalue()

    def pickled_weight(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            entry = config["config"]["net.head.weight"]
            entry["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/" + _weight_file(src, "net.head.weight")):
            return payload
        return data

    bad = _rewrite(src, tmp_path / "pickled.pt2", pickled_weight)
    with pytest.raises(CheckpointError, match=r"refused: its entry 'net.head.weight' is a pickled object, which kbricks never unpickles"):
        load_frozen({"path": str(bad), "normalize": "none"}, where="method.teacher")
    assert not marker.exists()
    with contextlib.suppress(Exception):  # torch itself unpickles that entry: the check above is what stops it
        torch.export.load(str(bad))
    assert marker.exists()
    marker.unlink()

    samples = _rewrite(src, tmp_path / "samples.pt2", lambda n, d: payload if "/data/sample_inputs/" in n else d)
    with pytest.raises(CheckpointError, match="sample inputs are not plain tensors"):
        load_program(samples, "teacher")
    assert not marker.exists()

    aoti = _rewrite(src, tmp_path / "aoti.pt2", lambda n, d: d)
    with zipfile.ZipFile(aoti, "a") as z:
        z.writestr(f"{_root(src)}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(CheckpointError, match="AOTInductor compiled code"):
        load_program(aoti, "teacher")

    expr = _rewrite(src, tmp_path / "expr.pt2", lambda n, d: d.replace(b"Symbol(", b"__import__('os').getcwd() or Symbol(")
                    if n.endswith("models/model.json") else d)
    with pytest.raises(CheckpointError, match="a shape expression uses '__import__'"):
        load_program(expr, "teacher")

    legacy = _rewrite(src, tmp_path / "legacy.pt2", lambda n, d: d)
    with zipfile.ZipFile(legacy, "a") as z:
        z.writestr(f"{_root(src)}/data/weights/model.pt", payload)
    with pytest.raises(CheckpointError, match="pickled \\(legacy\\) state dict"):
        load_program(legacy, "teacher")
    assert not marker.exists()

    broken = _rewrite(src, tmp_path / "broken.pt2", lambda n, d: d[: len(d) // 2] if n.endswith("models/model.json") else d)
    with pytest.raises(CheckpointError) as err:
        load_frozen({"path": str(broken), "normalize": "none"}, where="method.teacher")
    assert "\n" not in str(err.value) and "broken.pt2" in str(err.value)


def _root(pt2: Path) -> str:
    with zipfile.ZipFile(pt2) as z:
        return z.namelist()[0].split("/")[0]


def _weight_file(pt2: Path, fqn: str) -> str:
    with zipfile.ZipFile(pt2) as z:
        config = json.loads(z.read(f"{_root(pt2)}/data/weights/model_weights_config.json"))
    return config["config"][fqn]["path_name"]


def test_a_graph_calling_anything_but_torch_operators_is_refused():
    g = torch.fx.Graph()
    g.output(g.call_function(os.getcwd, ()))
    with pytest.raises(CheckpointError, match="its graph calls <built-in function getcwd>, which is not a torch operator"):
        _check_operators(types.SimpleNamespace(graph=g), Path("x.pt2"), "teacher")


class _FixedBatch(nn.Module):
    """A graph that bakes the batch size in (a reshape to the example's batch)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin(x.reshape(2, 8))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x * 2 if bool(x.mean() > 0.5) else x - 1)


def test_fixed_batch_fallback_is_said_and_data_dependent_flow_is_one_line(tmp_path):
    r = kbricks.export(_FixedBatch(), tmp_path / "fixed.pt2", example_input=torch.rand(2, 8))
    assert r["how"].startswith("torch.export, fixed batch; fixed batch size 2 (a dynamic batch failed:")
    assert r["checked_batch_sizes"] == [2, 2, 2] and r["max_abs_diff"] <= 1e-5
    assert read_export_metadata(tmp_path / "fixed.pt2")["batch"] == 2
    with pytest.raises(KbricksError, match=r"^torch.export.export failed on the network \(.*\); data-dependent Python control flow needs torch.cond"):
        kbricks.export(_DataDependent(), tmp_path / "dd.pt2", example_input=torch.rand(3, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.pt2"]


def test_no_torchscript_warning_unless_torchscript_is_asked_for(teacher, tmp_path):
    root, _ = teacher
    net = kbricks.load_model(root / "teacher")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kbricks.export(net, tmp_path / "n.pt2")
        read_export_metadata(tmp_path / "n.pt2")
        load_frozen({"path": str(tmp_path / "n.pt2"), "normalize": "none"}, example=_raw(2), where="teacher")
    with pytest.warns(FutureWarning, match="torch.jit"):  # asked for: torch's own deprecation notice
        kbricks.export(net, tmp_path / "n.pt", format="torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_export_metadata(tmp_path / "n.pt")["outputs"] == ["logits"]  # read from the archive, no torch.jit.load

"""Networks a user brings (docs/byo.md): hand-written modules with unusual structure, TorchScript files, import
paths with weights files, API objects; each checked with one batch of the data, with one-line errors."""

import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kbricks import build_config, train
from kbricks.cli import main
from kbricks.core.checkpoint import save_safetensors
from kbricks.errors import CheckpointError, ConfigError, DataError
from kbricks.models.frozen import load_frozen
from kbricks.models.spec import as_spec
from kbricks.models.taps import FeatureTap

USER_CODE = '''
import torch
from torch import nn


class Nested(nn.Module):
    """No `features`, nested containers, the classifier is not the last module registered."""

    def __init__(self, num_classes=10, width=16, in_features=64):
        super().__init__()
        self.parts = nn.ModuleDict({"trunk": nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(in_features, width), nn.Tanh()))})
        self.out = nn.ModuleList([nn.Linear(width, num_classes)])
        self.unused = nn.Identity()

    def forward(self, x):
        return self.out[0](self.parts["trunk"](x))


def make(num_classes, in_channels, image_size, width=16):
    """A factory that takes the data's shape arguments."""
    size = 1 if image_size is None else (image_size * image_size if isinstance(image_size, int) else image_size[0] * image_size[1])
    return Nested(num_classes, width, in_channels * size)
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    (tmp_path / "byo_nets.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib
    import sys

    sys.modules.pop("byo_nets", None)
    return importlib.import_module("byo_nets")


def _kd(teacher, **over):
    cfg = {
        "name": "byo", "seed": 0, "data": {"name": "digits", "train_subset": 128},
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "method": {"name": "kd", "teacher": teacher},
        "optim": {"name": "sgd", "lr": 0.1},
        "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2, "progress": "off", "plots": False},
    }
    cfg.update(over)
    return build_config(cfg)


def _fit(net, x, y, steps=20):
    """A few steps of the user's own loop (the tests check plumbing, not accuracy)."""
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x[:256]), y[:256]).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def digits01():
    from kbricks.data import load_dataset

    d = load_dataset("digits")
    return d.train.x, d.train.y, d.test.x, d.test.y


# ---- TorchScript ---------------------------------------------------------------------------------------------------


def test_torchscript_teacher_on_the_cli_states_its_convention(user_code, tmp_path, capsys, digits01):
    x, y, xt, yt = digits01
    teacher = _fit(user_code.Nested(), x, y)
    torch.jit.save(torch.jit.script(teacher), tmp_path / "teacher.pt")
    cfg = {"name": "t", "data": {"name": "digits", "train_subset": 128}, "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
           "method": {"name": "kd", "teacher": "teacher.pt"},
           "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2, "progress": "off", "plots": False}}
    (tmp_path / "kd.yaml").write_text(json.dumps(cfg))
    # a bare path: the convention is not guessed
    assert main(["train", "kd.yaml", "--run-dir", "r0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kbricks: error: invalid config:") and "Traceback" not in err
    assert "method.teacher: teacher.pt is a TorchScript file: state its input convention" in err and "normalize: none" in err
    assert main(["train", "kd.yaml", "--run-dir", "r1", "-o", "method.teacher={path: teacher.pt, normalize: none}"]) == 0
    capsys.readouterr()
    # the frozen TorchScript teacher gives the same logits as the module it was scripted from
    frozen = load_frozen({"path": "teacher.pt", "normalize": "none"}, None, x[:4], "t")
    assert torch.allclose(frozen(xt[:16]), teacher(xt[:16]), atol=1e-5)
    assert frozen.num_outputs == 10 and frozen.card["kind"] == "torchscript"


def test_torchscript_teacher_has_no_hooks_but_can_export_features(tmp_path):
    class WithFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Linear(64, 8), nn.Linear(8, 10)

        @torch.jit.export
        def features(self, x):
            return torch.relu(self.body(x.flatten(1)))

        def forward(self, x):
            return self.fc(self.features(x))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    x = torch.rand(3, 1, 8, 8)
    for cls, name in ((WithFeatures, "f.pt"), (Plain, "p.pt")):
        torch.jit.save(torch.jit.script(cls()), tmp_path / name)
    f = load_frozen({"path": str(tmp_path / "f.pt"), "normalize": "none"}, None, x)
    assert f.features(x).shape == (3, 8)
    p = load_frozen({"path": str(tmp_path / "p.pt"), "normalize": "none"}, None, x)
    with pytest.raises(ConfigError, match="torch.jit.export"):
        p.features(x)


def test_state_dict_or_pickled_model_is_not_a_network(tmp_path, user_code, capsys):
    """The reported failure: method.teacher=teacher_state_dict.pt gave a UnicodeDecodeError traceback."""
    torch.save(user_code.Nested().state_dict(), tmp_path / "sd.pt")
    torch.save(user_code.Nested(), tmp_path / "pickled.pt")
    for name in ("sd.pt", "pickled.pt"):
        with pytest.raises(ConfigError, match=r"not a TorchScript file.*import path"):
            load_frozen({"path": str(tmp_path / name), "normalize": "none"})
    (tmp_path / "kd.yaml").write_text(json.dumps({"data": {"name": "digits"}, "model": {"name": "mlp"}, "method": {"name": "kd", "teacher": "x"}}))
    assert main(["train", "kd.yaml", "-o", "method.teacher=sd.pt"]) == 2
    err = capsys.readouterr().err
    assert "sd.pt is not a TorchScript file" in err and "Traceback" not in err and "UnicodeDecodeError" not in err


# ---- import path + weights ---------------------------------------------------------------------------------------


def test_import_path_with_safetensors_or_pt_weights(user_code, tmp_path, digits01):
    x, y, xt, yt = digits01
    teacher = _fit(user_code.Nested(width=12), x, y)
    save_safetensors(teacher.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": teacher.state_dict(), "epoch": 3}, tmp_path / "w.pt")
    ref = teacher(xt[:8])
    for extra in ({"weights": "w.safetensors"}, {"weights": "w.pt", "weights_key": "state_dict"}):
        spec = {"path": "byo_nets:Nested", "kwargs": {"width": 12}, "normalize": "none", **extra}
        assert torch.allclose(load_frozen(spec, None, x[:2])(xt[:8]), ref, atol=1e-6)
    with pytest.raises(CheckpointError, match="weights_key"):  # the nested checkpoint without its key
        load_frozen({"path": "byo_nets:Nested", "kwargs": {"width": 12}, "weights": "w.pt", "normalize": "none"})
    torch.save(teacher, tmp_path / "model.pt")  # a pickled module: refused, never unpickled
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_frozen({"path": "byo_nets:Nested", "kwargs": {"width": 12}, "weights": "model.pt", "normalize": "none"})
    with pytest.raises(CheckpointError, match="shape mismatch"):  # wrong architecture for the weights
        load_frozen({"path": "byo_nets:Nested", "kwargs": {"width": 7}, "weights": "w.safetensors", "normalize": "none"})
    with pytest.raises(ConfigError, match="unknown argument"):
        load_frozen({"path": "byo_nets:Nested", "kwargs": {"depth": 2}, "normalize": "none"})


def test_input_and_output_shapes_are_checked_with_one_batch(user_code, tmp_path):
    save_safetensors(user_code.Nested(num_classes=5).state_dict(), tmp_path / "five.safetensors")
    five = {"path": "byo_nets:Nested", "kwargs": {"num_classes": 5}, "weights": "five.safetensors", "normalize": "none"}
    with pytest.raises(ConfigError) as e:
        train(_kd(five), tmp_path / "r5")
    assert "predicts 5 classes but the data has 10" in str(e.value) and "\n" not in str(e.value)
    big = {"path": "byo_nets:Nested", "kwargs": {"in_features": 784}, "normalize": "none"}
    with pytest.raises(ConfigError) as e:
        train(_kd(big), tmp_path / "r784")
    msg = str(e.value)
    assert "[2, 1, 8, 8]" in msg and "784" in msg and "\n" not in msg
    # stated conversion: the 8x8 data resized to 28x28 fit a teacher of 28x28 inputs
    resized = dict(big, input={"size": 28})
    summary = train(_kd(resized), tmp_path / "r28")
    assert 0 <= summary["final"]["test/acc"] <= 1


def test_tampered_kbricks_teacher_is_refused(tmp_path, tiny_cfg):
    from kbricks.core.checkpoint import load_safetensors

    run = tmp_path / "teacher"
    train(tiny_cfg(), run)
    assert load_frozen(run, None, torch.rand(2, 1, 8, 8)).num_outputs == 10
    tensors = load_safetensors(run / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 0.01
    save_safetensors(tensors, run / "model.safetensors")
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_frozen(run)
    with pytest.raises(ConfigError, match="records its own input normalisation"):
        as_spec({"path": str(run), "normalize": "none"}, "method.teacher")


# ---- Python objects ------------------------------------------------------------------------------------------------


def test_module_and_callable_teachers_in_a_config_dict(user_code, tmp_path, digits01):
    """The reported failure: an nn.Module in method.teacher was 'Input should be a valid string'."""
    x, y, _, _ = digits01
    teacher = _fit(user_code.Nested(), x, y)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    s1 = train(_kd(teacher), tmp_path / "mod")
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # the user's object is untouched
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    s2 = train(_kd(lambda b: teacher(b)), tmp_path / "fn")  # any callable returning logits
    assert s1["final"]["test/acc"] == s2["final"]["test/acc"]
    cfg = json.loads(json.dumps(_kd(teacher).to_dict()))
    assert cfg["method"]["teacher"].startswith("memory:")


def test_feature_tap_defaults_to_the_input_of_the_head(user_code):
    net = user_code.Nested(width=6)
    x = torch.rand(4, 1, 8, 8)
    out, z = FeatureTap(net)(x)
    assert z.shape == (4, 6) and torch.allclose(net.out[0](z), out)
    _, z2 = FeatureTap(net, "parts.trunk.0")(x)  # a named layer's output, flattened
    assert z2.shape == (4, 64)
    with pytest.raises(ConfigError, match="no layer 'trunk'"):
        FeatureTap(net, "trunk")
    frozen = load_frozen({"path": "byo_nets:Nested", "kwargs": {"width": 6}, "normalize": "none", "features": "parts.trunk.1"}, None, x)
    assert frozen.features(x).shape == (4, 6)


# ---- user networks as trainable models (model.name) ------------------------------------------------------------


def test_import_path_and_api_class_as_model_name(user_code, tmp_path):
    cfg = _kd("x", model={"name": "byo_nets:make", "kwargs": {"width": 8}}, method={"name": "supervised"})
    summary = train(cfg, tmp_path / "imp")
    assert summary["final"]["test/acc"] >= 0
    with pytest.raises(ConfigError, match="unknown argument"):
        _kd("x", model={"name": "byo_nets:make", "kwargs": {"depth": 8}}, method={"name": "supervised"})
    with pytest.raises(ConfigError, match="outputs 3 classes but the data have 10"):
        train(_kd("x", model={"name": user_code.Nested(num_classes=3)}, method={"name": "supervised"}), tmp_path / "three")


# ---- input shapes ----------------------------------------------------------------------------------------------


def test_flat_vectors_factorize_with_a_user_mlp_teacher(user_code, digits01, tmp_path):
    """The reported failure: an MLP teacher on flat [N, 64] vectors failed at the first step."""
    import kbricks

    x, y, xt, yt = digits01
    xf, xtf = x.flatten(1), xt.flatten(1)
    teacher = _fit(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), xf, y)
    fac = kbricks.factorize(teacher, (xf, y), test=(xtf, yt), tasks=2, epochs=1, run_dir=tmp_path / "flat", progress="off",
                            overrides=["train.max_steps_per_epoch=3", "train.plots=false"])
    net = fac.assemble()
    assert net.manifests[0]["architecture"]["image_size"] is None
    assert net.manifests[0]["architecture"]["in_channels"] == 64
    assert 0 <= fac.assembled_accuracy(xtf, yt) <= 1
    kbricks.export(fac.assemble(), tmp_path / "flat.pt", format="torchscript")  # no example given: its recorded input [64]
    assert torch.allclose(torch.jit.load(str(tmp_path / "flat.pt"))(xtf[:7]), fac.assemble()(xtf[:7]), atol=1e-5)
    # the CKN a user class, the TSNs a user factory by import path: bricks that assemble into the trained networks
    fac = kbricks.factorize(teacher, (xf, y), test=(xtf, yt), tasks=2, epochs=1, run_dir=tmp_path / "user", progress="off",
                            ckn=user_code.make, tsn={"name": "byo_nets:make", "kwargs": {"width": 8}},
                            overrides=["train.max_steps_per_epoch=3", "train.plots=false"])
    assert fac.model.ckn.feature_dim == 16 and fac.model.tsns[0].backbone.feature_dim == 8
    assert fac.assembled_accuracy(xtf, yt) == fac.accuracy(xtf, yt)


def test_non_square_images_train_and_reload(tmp_path):
    from kbricks.data import ArrayDataset
    from kbricks.models.frozen import load_trained_model

    ds = ArrayDataset(torch.rand(8, 3, 6, 10), torch.zeros(8), ["a"])
    assert ds.image_size == (6, 10) and ds.input_shape == (3, 6, 10)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.rand(96, 1, 6, 10, generator=g) * 0.2
    x[torch.arange(96), 0, 2 * y, 3 * y] = 1.0  # a bright pixel whose place gives the class
    import kbricks

    for model in ("small_cnn", "mlp"):
        run = kbricks.distill((x, y), method="supervised", student=model, epochs=1, batch_size=16, run_dir=tmp_path / model,
                              progress="off", overrides=["train.plots=false"])
        net, card = load_trained_model(run.run_dir)
        assert card["image_size"] == [6, 10]
        assert net(torch.rand(2, 1, 6, 10)).shape == (2, 3)
    # the reported failure: [N, 1, 1, 64] data assumed square
    run = kbricks.distill((x.reshape(96, 1, 1, 60), y), method="supervised", student="mlp", epochs=1, batch_size=16,
                          run_dir=tmp_path / "row", progress="off", overrides=["train.plots=false"])
    assert load_trained_model(run.run_dir)[1]["image_size"] == [1, 60]


def test_flat_data_refuses_image_augmentation_and_cnns():
    with pytest.raises(DataError, match="crop_padding and hflip need images"):
        from kbricks.data import BatchAugment

        BatchAugment(crop_padding=1, input_shape=(64,))
    from kbricks.models import create_model

    with pytest.raises(ConfigError, match="small_cnn needs images"):
        create_model("small_cnn", num_classes=10, in_channels=64, image_size=None)
    with pytest.raises(ConfigError, match=r"fails on one batch of the data \(input shape \[2, 64\]\)"):
        create_model("resnet8", num_classes=10, in_channels=64, image_size=None)


def test_npz_never_rescales_silently(tmp_path):
    from kbricks.data import load_dataset

    rng = np.random.default_rng(0)
    x16 = rng.integers(0, 17, size=(40, 8, 8)).astype(np.float64)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", X=x16, y=y)
    with pytest.raises(DataError) as e:
        load_dataset("npz", root=str(tmp_path / "d.npz"))
    assert "[0, 16]" in str(e.value) and "scale=16" in str(e.value)
    d = load_dataset("npz", root=str(tmp_path / "d.npz"), scale=16, test_fraction=0.25)
    assert d.train.x.shape[1:] == (1, 8, 8) and float(d.train.x.max()) <= 1.0
    np.savez(tmp_path / "flat.npz", x_train=rng.normal(size=(30, 5)), y_train=np.arange(30) % 3,
             x_test=rng.normal(size=(9, 5)), y_test=np.arange(9) % 3)
    flat = load_dataset("npz", root=str(tmp_path / "flat.npz"), scale=1)  # standardised features, kept as they are
    assert flat.train.x.shape == (30, 5) and flat.train.image_size is None and float(flat.train.x.min()) < 0


# ---- SSKT sources with other label spaces and resolutions --------------------------------------------------------


def test_sskt_sources_of_other_label_spaces_and_resolutions(digits01, tmp_path):
    import kbricks

    x, y, xt, yt = digits01
    big = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 6))  # a 16x16 source of 6 classes
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))  # an 8x8 source of 2 classes
    run = kbricks.distill((x[:200], y[:200]), test=(xt, yt), method="sskt", student={"name": "mlp", "kwargs": {"hidden": [16]}},
                          sources=[{"path": big, "input": {"size": 16}}, small], epochs=1, run_dir=tmp_path / "sskt", progress="off",
                          overrides=["train.max_steps_per_epoch=2", "train.plots=false"])
    heads = [h.out_features for h in run.method.heads]
    assert heads == [6, 2]
    with pytest.raises(ConfigError, match="fails on one batch"):  # without the stated resize
        kbricks.distill((x[:200], y[:200]), method="sskt", sources=[big], epochs=1, run_dir=tmp_path / "bad", progress="off")


@pytest.mark.parametrize("method", ["dml", "maxl"])
def test_user_class_as_the_student_of_every_method(user_code, method, tmp_path, digits01):
    """A user module without `features` / `head` is a kbricks classifier through its head, found by running it."""
    import kbricks

    x, y, xt, yt = digits01
    run = kbricks.distill((x[:128], y[:128]), test=(xt[:64], yt[:64]), method=method, student=user_code.Nested, epochs=1,
                          run_dir=tmp_path / method, progress="off", overrides=["train.max_steps_per_epoch=2", "train.plots=false"])
    assert isinstance(run.model.module, user_code.Nested) and run.model.feature_dim == 16
    assert run.predict(xt[:5]).shape == (5, 10)


def test_kf_default_infomax_falls_back_to_two_views_for_a_featureless_torchscript_teacher(user_code, tmp_path, capsys, digits01):
    x, y, _, _ = digits01
    torch.jit.save(torch.jit.script(_fit(user_code.Nested(), x, y)), tmp_path / "teacher.pt")
    teacher = {"path": "teacher.pt", "normalize": "none"}

    def kf(**method):
        return build_config({
            "name": "kf", "seed": 0, "data": {"name": "digits", "train_subset": 128, "tasks": {"split": 2}},
            "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
            "method": {"name": "kf", "teacher": teacher, "tsn": {"name": "mlp", "kwargs": {"hidden": [8]}}, **method},
            "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2, "progress": "off", "plots": False}})

    from kbricks.engine.experiment import build_experiment

    method = build_experiment(kf()).method
    assert method.params.infomax == "views" and hasattr(method, "projector")
    assert "using method.infomax=views" in capsys.readouterr().err
    # chosen explicitly, the missing features are an error naming the way out
    with pytest.raises(ConfigError, match="torch.jit.export"):
        build_experiment(kf(infomax="teacher"))

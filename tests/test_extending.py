"""docs/architecture.md's "how to add a method / a dataset / a model", each done with one small file of user code
loaded by `--import`, then used from a config; and its "method with a teacher" recipe, examples/fitnets.py."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from safetensors import safe_open

from kbricks.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"

MODEL = '''
from torch import nn
from kbricks.models import MODELS, Classifier

class TwoLayer(Classifier):
    def __init__(self, num_classes, in_features, hidden):
        super().__init__(hidden, num_classes)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())

    def features(self, x):
        return self.body(x)

@MODELS.register("ext_two_layer")
def ext_two_layer(num_classes=10, in_channels=1, image_size=8, hidden=32):
    return TwoLayer(num_classes, in_channels * image_size * image_size, hidden)
'''

DATASET = '''
import torch
from kbricks.data import DATASETS, ArrayDataset, DataSplits

@DATASETS.register("ext_stripes")
def ext_stripes(n: int = 400, seed: int = 0):
    """Vertical (0) or horizontal (1) stripes on 8x8 images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.zeros(n, 1, 8, 8)
    x[y == 0, :, :, ::2] = 1.0
    x[y == 1, :, ::2, :] = 1.0
    x = (x + 0.1 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1)
    classes = ["vertical", "horizontal"]
    return DataSplits(ArrayDataset(x[:300], y[:300], classes), ArrayDataset(x[300:], y[300:], classes), name="ext_stripes")
'''

METHOD = '''
import torch.nn.functional as F
from pydantic import Field
from kbricks.methods import METHODS, Method, MethodParams
from kbricks.methods.supervised import build_network

def smoothed_ce(logits, y, eps):
    """The pure loss: cross-entropy against labels smoothed by eps."""
    return F.cross_entropy(logits, y, label_smoothing=eps)

@METHODS.register("ext_smooth")
class Smooth(Method):
    class Config(MethodParams):
        eps: float = Field(0.1, ge=0, lt=1)

    def __init__(self, params, ctx):
        super().__init__()
        self.params, self.net = params, build_network(ctx)

    def training_step(self, batch):
        loss = smoothed_ce(self.net(batch.x), batch.y, self.params.eps)
        return {"loss": loss}

    def predict(self, x):
        return self.net(x)

    def export_module(self):
        return self.net
'''


def test_one_file_each_for_a_model_a_dataset_and_a_method(tmp_path, monkeypatch, capsys):
    for name, code in (("ext_model", MODEL), ("ext_dataset", DATASET), ("ext_method", METHOD)):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    cfg = {"name": "ext", "data": {"name": "ext_stripes", "augment": {"normalize": False}},
           "model": {"name": "ext_two_layer", "kwargs": {"hidden": 16}}, "method": {"name": "ext_smooth", "eps": 0.05},
           "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}, "train": {"epochs": 3, "batch_size": 32, "progress": "off", "plots": False}}
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    imports = ["--import", "ext_model", "--import", "ext_dataset", "--import", "ext_method"]
    assert main([*imports, "train", "ext.yaml", "--run-dir", "run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["final"]["test/acc"] > 0.9  # stripes are easy; chance is 0.5
    assert main([*imports, "list", "--pattern", "ext_*"]) == 0
    out = capsys.readouterr().out
    assert "ext_two_layer" in out and "ext_stripes" in out and "ext_smooth" in out


def test_a_plugin_run_records_its_modules_and_is_evaluated_and_exported_in_a_fresh_process(tmp_path, monkeypatch, capsys):
    """`--import` after the command; model.json records the plugin modules; `kbricks evaluate` and `kbricks export`
    in another process (which has not imported them) import them again from the card."""
    (tmp_path / "ext_model.py").write_text(textwrap.dedent(MODEL))
    (tmp_path / "ext_method.py").write_text(textwrap.dedent(METHOD))
    cfg = {"name": "ext", "data": {"name": "digits", "train_subset": 128},
           "model": {"name": "ext_two_layer", "kwargs": {"hidden": 16}}, "method": {"name": "ext_smooth"},
           "train": {"epochs": 1, "batch_size": 32, "progress": "off", "plots": False}}
    (tmp_path / "ext.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "ext.yaml", "--run-dir", "run", "--import", "ext_model", "--import", "ext_method"]) == 0
    acc = json.loads(capsys.readouterr().out)["final"]["test/acc"]
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["imports"] == ["ext_model", "ext_method"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    ev = subprocess.run([sys.executable, "-m", "kbricks", "evaluate", "run"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["test/acc"] == acc
    ex = subprocess.run([sys.executable, "-m", "kbricks", "export", "run", "--out", "net.pt"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ex.returncode == 0, ex.stderr
    assert json.loads(ex.stdout)["max_abs_diff"] <= 1e-5
    # without the module where it was, evaluate names the recorded module and the fix
    (tmp_path / "ext_method.py").rename(tmp_path / "gone.py")
    bad = subprocess.run([sys.executable, "-m", "kbricks", "evaluate", "run"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "plugin module 'ext_method'" in bad.stderr and "Traceback" not in bad.stderr


BROKEN = '''
from kbricks.methods import METHODS, Method

@METHODS.register("ext_broken")
class Broken(Method):
    def __init__(self, params, ctx):
        super().__init__()
        self.table = {}["missing_key"]
'''


def test_an_error_in_a_method_constructor_names_the_method(tmp_path, monkeypatch, capsys):
    (tmp_path / "ext_broken.py").write_text(textwrap.dedent(BROKEN))
    cfg = {"data": {"name": "digits", "train_subset": 64}, "model": {"name": "mlp"}, "method": {"name": "ext_broken"},
           "train": {"epochs": 1, "progress": "off"}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "b.yaml", "--import", "ext_broken", "--run-dir", "r"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("kbricks: error: method 'ext_broken' (ext_broken.Broken) failed in its constructor: KeyError: "
                           "'missing_key'")
    assert not (tmp_path / "r").exists()  # a failed start leaves no run behind


EXAMPLES = SRC.parent / "examples"


def test_fitnets_worked_example_trains_logs_its_hint_and_is_evaluated_in_a_fresh_process(tmp_path, monkeypatch, capsys):
    """docs/architecture.md's "add a method with a teacher": examples/fitnets.py, loaded with --import after the
    command, distils a teacher trained here; its hint loss is logged and falls; a fresh process evaluates the run."""
    budget = {"optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}, "train": {"epochs": 3, "batch_size": 32, "progress": "off", "plots": False}}
    teacher = {"name": "teacher", "data": {"name": "digits", "train_subset": 320}, "model": {"name": "small_cnn", "kwargs": {"widths": [16, 32]}},
               "method": {"name": "supervised"}, **budget}
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as PYTHONPATH=examples does on the command line
    assert main(["train", "teacher.yaml", "--run-dir", "teacher"]) == 0
    teacher_acc = json.loads(capsys.readouterr().out)["final"]["test/acc"]
    small = [f"{section}.{k}={json.dumps(v)}" for section, d in budget.items() for k, v in d.items()]
    small += ["method.teacher=teacher", "data.train_subset=320", "data.augment.crop_padding=0"]
    argv = ["train", str(EXAMPLES / "fitnets.yaml"), "--run-dir", "student", *[w for o in small for w in ("-o", o)], "--import", "fitnets"]
    assert main(argv) == 0
    acc = json.loads(capsys.readouterr().out)["final"]["test/acc"]
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    hints = [r["train/hint"] for r in rows]
    assert acc > 0.5 and teacher_acc > 0.5  # ten classes: chance is 0.1
    assert len(hints) == 3 and all(0 <= h < float("inf") for h in hints), hints
    assert hints[-1] < hints[0], hints  # the regressed student features move towards the teacher's
    assert all({"train/kd", "train/ce"} <= set(r) for r in rows)
    card = json.loads((tmp_path / "student" / "model.json").read_text())
    assert (card["method"], card["imports"], card["network"]) == ("fitnets", ["fitnets"], "classifier")
    with safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as f:  # the student alone: no regressor, no teacher
        assert f.keys() and not [k for k in f.keys() if k.startswith(("regressor", "teacher"))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    ev = subprocess.run([sys.executable, "-m", "kbricks", "evaluate", "student"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["test/acc"] == acc
    assert main(["options", "fitnets", "--import", "fitnets"]) == 0
    options = capsys.readouterr().out
    for line in ("method.teacher: NetworkSpec (required)", "method.student_layer: str | None (default null)",
                 "method.hint_weight: float (default 1.0, >= 0)"):
        assert line in options, options
    # named layers: a feature map of each network (flattened), and a misspelt one refused in one line before training
    named = argv + ["-o", "method.student_layer=body.1", "-o", "method.teacher_layer=body.0", "-o", "train.epochs=1"]
    assert main([*named[:3], "mid", *named[4:]]) == 0
    mid = json.loads((tmp_path / "mid" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= mid["train/hint"] < float("inf")
    capsys.readouterr()
    assert main([*named[:3], "bad", *named[4:], "-o", "method.student_layer=body.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kbricks: error: method.student_layer has no layer 'body.9'; its layers include ['head', 'body'"), err
    assert "\n" not in err and not (tmp_path / "bad").exists()


def test_the_architecture_recipe_quotes_examples_fitnets_as_it_is_and_names_four_files():
    """The doc's FitNets block is an exact copy of the example's code (so it cannot drift), and the files a newcomer
    is told to read are this document plus three that exist."""
    doc = (SRC.parent / "docs" / "architecture.md").read_text()
    quoted = re.search(r"doc-test: skip \(examples/fitnets\.py[^\n]*\n```python\n(.*?)\n```", doc, re.S)
    assert quoted, "docs/architecture.md lost its FitNets block"
    assert quoted.group(1) in (EXAMPLES / "fitnets.py").read_text()
    assert "class FitNets(Method)" in quoted.group(1) and "def fitnets_loss" in quoted.group(1)
    section = doc[doc.index("## How to add a method with a teacher"):]
    to_read = re.findall(r"\*\*`(src/kbricks/[\w/]+\.py)`\*\*", section[:section.index("The toolkit")])
    assert to_read == ["src/kbricks/methods/base.py", "src/kbricks/methods/_teacher.py", "src/kbricks/models/taps.py"]
    assert all((SRC.parent / p).exists() for p in to_read)


DENSE_STRATEGY = '''
import torch
from pydantic import Field
from kbricks.continual import ContinualPlugin, ContinualStrategy, DenseParams
from kbricks.methods import METHODS

class L2ToPrevious(ContinualPlugin):
    """strength * ||w - w_previous_task||^2 once a task is learned."""
    name = "l2"

    def __init__(self, strength):
        super().__init__()
        self.strength, self.anchor = strength, {}

    def after_task(self, strategy, t):
        self.anchor = {k: w.detach().clone() for k, w in strategy.net.named_parameters()}

    def loss(self, strategy, x, out, tasks):
        if not self.anchor:
            return None
        return self.strength * sum(((w - self.anchor[k]) ** 2).sum() for k, w in strategy.net.named_parameters())

    def fixed_bytes(self, strategy):
        return 4.0 * sum(w.numel() for w in strategy.net.parameters())

    def get_extra_state(self):
        return dict(self.anchor)

    def set_extra_state(self, state):
        self.anchor = dict(state)

@METHODS.register("ext_l2", tags=("continual",))
class L2Strategy(ContinualStrategy):
    class Config(DenseParams):
        strength: float = Field(1.0, ge=0)

    def make_plugins(self):
        return [L2ToPrevious(self.params.strength)]
'''


def test_a_dense_continual_strategy_in_one_file_trains_through_the_engine(tmp_path, monkeypatch, capsys):
    """A new continual baseline is a plugin and a ContinualStrategy subclass naming it: the template's defaults do the
    rest (stages, heads, evaluation, storage, checkpoints). The L2 pull towards the previous task's weights forgets
    less than plain fine-tuning of the same network with the same budget, and the plugin's loss is logged."""
    (tmp_path / "ext_l2.py").write_text(textwrap.dedent(DENSE_STRATEGY))
    monkeypatch.chdir(tmp_path)
    cfg = {"data": {"name": "digits", "scenario": {"name": "permuted", "num_tasks": 3}},
           "model": {"name": "masked_mlp", "kwargs": {"hidden": [32, 32]}}, "method": {"name": "ext_l2", "strength": 0.05},
           "optim": {"name": "adam", "lr": 0.005, "weight_decay": 0.0, "schedule": "constant"},
           "train": {"epochs": 3, "batch_size": 64, "progress": "off", "plots": False}}
    for name, method in (("l2", cfg["method"]), ("ft", {"name": "finetune"})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, "name": name, "method": method}))
        assert main(["train", f"{name}.yaml", "--run-dir", name, "--import", "ext_l2"]) == 0
    capsys.readouterr()
    l2, ft = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("l2", "ft"))
    assert len(l2["accuracy_matrix"]) == 3 and l2["accuracy_matrix"][0][0] > 0.5
    assert l2["forgetting"] < ft["forgetting"], (l2["forgetting"], ft["forgetting"])
    assert l2["fixed_bytes"] == 4 * (64 * 32 + 32 * 32 + 32 * 10) and l2["bytes_per_task"] == 0 and not l2["uses_task_id"]
    rows = [json.loads(line) for line in (tmp_path / "l2" / "metrics.jsonl").read_text().splitlines()]
    l2_terms = [r["train/l2"] for r in rows if "train/l2" in r]
    assert l2_terms and all(v >= 0 for v in l2_terms) and not any("train/l2" in r for r in rows if r.get("task") == 1)


def test_the_baselines_keep_their_plugin_state_across_a_resume_and_count_what_they_store(tmp_path):
    """EWC (Fisher + anchor), LwF (the teacher) and ER (the buffer) stopped after a task and resumed give the
    uninterrupted run's accuracy matrix; per-task bytes count a head's rows and the replayed samples."""
    from kbricks import build_config
    from kbricks.engine.run import run_continual

    def cfg(method, **extra):
        return build_config({"name": method, "data": {"name": "digits", "scenario": {"name": "split", "num_tasks": 5}},
                             "model": {"name": "masked_mlp", "kwargs": {"hidden": [32]}}, "method": {"name": method, "head": "per_task", **extra},
                             "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "schedule": "constant"},
                             "train": {"epochs": 2, "batch_size": 64, "progress": "off", "plots": False}}, [])

    head = 4 * 32 * 2  # one task's two rows of the 32 -> 10 output layer (bias-free)
    sample = 4 * 64 + 8 + 8  # an 8x8 float32 image, its label and its task id
    for method, extra, per_task in (("ewc", {"fisher_samples": 50}, head), ("lwf", {}, head), ("er", {"buffer_per_task": 20}, head + 20 * sample)):
        full = run_continual(cfg(method, **extra), tmp_path / f"{method}-full")
        assert run_continual(cfg(method, **extra), tmp_path / f"{method}-part", stop_after=2)["stopped_after"] == 2
        resumed = run_continual(cfg(method, **extra), tmp_path / f"{method}-part", resume=True)
        assert resumed["accuracy_matrix"] == full["accuracy_matrix"], method
        assert full["bytes_per_task"] == per_task and full["uses_task_id"], method
    assert full["fixed_bytes"] == 0 and full["plugins"]["replay"]["stored"] == 5 * 20

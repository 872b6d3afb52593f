"""The zoo matrix (issue 23, point 2): torchvision and timm networks, random weights (nothing is downloaded), in
every role kbricks gives a network. One test per (model, role) so that scripts/zoo_matrix.py can write the table in
docs/byo.md from the results.

Roles: KF teacher (-> bricks -> assembled -> TorchScript export equal to eager), KD teacher and student, SSKT source
and student, supermask backbone (SupSup, 2 tasks, no forgetting; supermask()'s equivalence check runs when the
backbone is converted) and features read from a layer named in the spec. Each model's runs are shared by its roles
(KD teacher M -> student M; SSKT source M -> student M) and made once per model, on 64 random 3x32x32 images with
one optimiser step per epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch
from torch import nn

import kbricks
import kbricks.api
from kbricks.core.hooks import Hook
from kbricks.models.frozen import load_frozen
from kbricks.models.open import load_trained_model
from kbricks.registry import OBJECTS

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CLASSES, SOURCE_CLASSES, TASKS = 4, 5, 2
STEPS = ["train.max_steps_per_epoch=1", "train.plots=false"]
SMALL = {"name": "small_cnn", "kwargs": {"widths": [8, 8]}}  # the non-zoo side of a run (CKN, TSN)


@dataclasses.dataclass(frozen=True)
class Zoo:
    """A zoo model as a student / backbone names it (``spec``) and as a user hands over a trained network
    (``build(num_classes)``: a plain nn.Module), with a layer to read features from by name."""

    spec: Dict[str, Any]
    build: Callable[[int], nn.Module]
    layer: str
    bugs: Dict[str, str] = dataclasses.field(default_factory=dict)  # role -> the src bug that makes it fail (xfail)


def _named(spec: str, layer: str, **kwargs) -> Zoo:
    return Zoo({"name": spec, "kwargs": kwargs}, lambda n: kbricks.zoo(spec, **kwargs)(num_classes=n, image_size=32), layer)


def _tv_vit(n: int) -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, num_classes=n, **TV_VIT)


def _resnetv2(n: int) -> nn.Module:
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(num_classes=n, **RESNETV2)


# a ViT small enough for CPU tests; a ResNetV2 with timm's default StdConv2d (weight standardisation) + GroupNormAct
TV_VIT = {"patch_size": 16, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
RESNETV2 = {"layers": [1, 1, 1, 1], "channels": [128, 128, 128, 128], "stem_chs": 32}

MODELS: Dict[str, Zoo] = {
    "torchvision:resnet18": _named("torchvision:resnet18", "layer4"),
    "torchvision:mobilenet_v3_small": _named("torchvision:mobilenet_v3_small", "features"),
    "torchvision:efficientnet_b0": _named("torchvision:efficientnet_b0", "features.8"),
    "torchvision:VisionTransformer (2 layers, 32 px)": Zoo({"name": "torchvision.models:VisionTransformer", "kwargs": TV_VIT},
                                                          _tv_vit, "encoder.ln"),
    "timm:resnet18": _named("timm:resnet18", "layer4"),
    "timm:mobilenetv3_small_050": _named("timm:mobilenetv3_small_050", "conv_head"),
    "timm:efficientnet_b0": _named("timm:efficientnet_b0", "bn2"),
    "timm:vit_tiny_patch16_224 (32 px, depth 2)": _named("timm:vit_tiny_patch16_224", "norm", depth=2),
    "timm:tf_mobilenetv3_small_minimal_100 (Conv2dSame)": _named("timm:tf_mobilenetv3_small_minimal_100", "conv_head"),
    # its classifier is a 1x1 Conv2d (timm's ClassifierHead(use_conv=True)): a trained student names it (head:)
    "timm:ResNetV2 (StdConv2d, 4 blocks)": Zoo({"name": "timm.models.resnetv2:ResNetV2", "kwargs": RESNETV2, "head": "head.fc"},
                                               _resnetv2, "norm"),
}

# the model's parameter, module-scoped: pytest groups every role of one model together, and the runs it shares
# (``runs`` below) are made once and dropped before the next model
by_model = pytest.mark.parametrize("model", list(MODELS), scope="module")


# ---- data and runs -----------------------------------------------------------------------------------------------


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 3, 32, 32, generator=g)
    y = torch.arange(80) % CLASSES
    return (x[:64], y[:64]), (x[64:], y[64:])


class _TaskOneLogits(Hook):
    """Task 1's logits on ``x`` right after task 1 was learned (to compare with those after the last task)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.logits = x, None

    def on_task_end(self, state, task, metrics) -> None:
        if task == 1:
            strategy, was = state.method, state.method.training
            strategy.eval()
            with torch.no_grad():
                self.logits = strategy.predict_task(state.exp.transform(self.x, train=False), 0).clone()
            strategy.train(was)


@pytest.fixture(scope="module")
def run_root():
    """Run directories on tmpfs where there is one: checkpoints of 11M-parameter networks dominate otherwise."""
    shm = "/dev/shm"
    root = Path(tempfile.mkdtemp(prefix="kbricks-zoo-", dir=shm if os.access(shm, os.W_OK) else None))
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Runs:
    """The runs of one model, each made on first use and shared by the roles that read it; a run that failed
    fails every role that needs it with the same error."""

    def __init__(self, name: str, zoo: Zoo, root: Path):
        self.name, self.zoo, self.root = name, zoo, root
        self.train, self.test = _data()
        self.common = dict(test=self.test, epochs=1, batch_size=8, progress="off", overrides=STEPS)
        self._made: Dict[str, Any] = {}
        self._teachers: Dict[int, nn.Module] = {}

    def get(self, kind: str):
        if kind not in self._made:
            try:
                self._made[kind] = getattr(self, f"_{kind}")(self.root / kind)
            except Exception as exc:  # kept, so the other roles of this run report it too
                self._made[kind] = exc
        made = self._made[kind]
        if isinstance(made, Exception):
            raise made
        return made

    def teacher(self, n: int) -> nn.Module:
        """The user's trained network (random weights), one per class count, shared by the runs that take it."""
        if n not in self._teachers:
            torch.manual_seed(n)
            self._teachers[n] = self.zoo.build(n).eval()
        return self._teachers[n]

    def _kf(self, run_dir):
        teacher = self.teacher(CLASSES)
        spec = {"path": teacher, "features": self.zoo.layer}  # KF's InfoMax reads the named layer
        return teacher, kbricks.factorize(spec, self.train, tasks=TASKS, ckn=SMALL, tsn=SMALL, run_dir=run_dir, **self.common)

    def _kd(self, run_dir):
        teacher = self.teacher(CLASSES)
        return teacher, kbricks.distill(self.train, method="kd", teacher=teacher, student=self.zoo.spec, run_dir=run_dir, **self.common)

    def _sskt(self, run_dir):
        source = self.teacher(SOURCE_CLASSES)  # another label space
        student = SMALL if "sskt_student" in self.zoo.bugs else self.zoo.spec  # the source role stands on its own then
        return source, kbricks.distill(self.train, method="sskt", sources=[source], student=student, run_dir=run_dir,
                                       **self.common)

    def _sskt_student(self, run_dir):
        return None, kbricks.distill(self.train, method="sskt", sources=[self.teacher(SOURCE_CLASSES)], student=self.zoo.spec,
                                     run_dir=run_dir, **self.common)

    def _supsup(self, run_dir):
        x_task1 = self.test[0][self.test[1] < CLASSES // TASKS]
        hook = _TaskOneLogits(x_task1)
        run_training = kbricks.api.run_training
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kbricks.api, "run_training", lambda cfg, d, **kw: run_training(cfg, d, **{**kw, "hooks": [*kw["hooks"], hook]}))
            run = kbricks.learn_continually(self.zoo.spec, self.train, method="supsup", scenario="split", num_tasks=TASKS,
                                            run_dir=run_dir, **self.common)
        return hook, x_task1, run


@pytest.fixture(scope="module")
def runs(model, run_root):
    yield Runs(model, MODELS[model], run_root / model.split(" ")[0].replace(":", "-"))


def _metrics(run) -> list:
    return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]


def _finite_losses(run, *names):
    row = next(r for r in _metrics(run) if "epoch" in r)
    for name in names:
        assert torch.isfinite(torch.tensor(row[name])), (name, row)


def _student_checks(runs, run, reload: bool):
    """The student is the zoo network, trained, and its run reloads as a network with the same outputs."""
    x = runs.test[0]
    assert run.predict(x).shape == (len(x), CLASSES)
    assert type(run.model.module).__name__ == type(runs.teacher(CLASSES)).__name__
    if not reload:
        return
    reloaded, card = load_trained_model(run.run_dir)
    assert card["model"]["name"] == runs.zoo.spec["name"]
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x), run.model.eval()(x), atol=1e-5)


# ---- the roles -----------------------------------------------------------------------------------------------------


@by_model
@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript's deprecation notice: the format asked for here
def test_kf_teacher(runs, tmp_path):
    teacher, fac = runs.get("kf")
    x, y = runs.test
    assert sorted(fac.bricks) == ["ckn", "classes_0-1", "classes_2-3"] and all(p.exists() for p in fac.bricks.values())
    net = fac.assemble()
    with torch.no_grad():
        eager = net.eval()(x)
    assert eager.shape == (len(x), CLASSES) and 0 <= fac.assembled_accuracy(x, y) <= 1
    result = kbricks.export(net, tmp_path / "assembled.pt", format="torchscript", example_input=x[:4])
    assert result["max_abs_diff"] <= 1e-5
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "assembled.pt"))(x), eager, atol=1e-5)


@by_model
def test_kd_teacher(runs):
    teacher, run = runs.get("kd")
    x = runs.test[0]
    with torch.no_grad():  # the run's teacher is the user's network, taking the data as given (the run's input undone)
        assert torch.allclose(run.method.teacher(run.normalize(x)), teacher(x), atol=1e-4)
    assert run.method.teacher.num_outputs == CLASSES
    _finite_losses(run, "train/loss", "train/kd")


@by_model
def test_kd_student(runs):
    _, run = runs.get("kd")
    _student_checks(runs, run, reload=True)


@by_model
def test_sskt_source(runs):
    source, run = runs.get("sskt")
    x = runs.test[0]
    (used,) = run.method.sources
    with torch.no_grad():
        assert torch.allclose(used(run.normalize(x)), source(x), atol=1e-4)
    assert used.num_outputs == SOURCE_CLASSES and run.method.heads[0].out_features == SOURCE_CLASSES
    _finite_losses(run, "train/loss", "train/aux")


@by_model
def test_sskt_student(runs, request):
    if "sskt_student" in runs.zoo.bugs:
        request.applymarker(pytest.mark.xfail(strict=True, reason=runs.zoo.bugs["sskt_student"]))
    _, run = runs.get("sskt_student" if "sskt_student" in runs.zoo.bugs else "sskt")
    assert run.method.heads[0].in_features == run.method.net.feature_dim  # the auxiliary head reads the student's features
    _student_checks(runs, run, reload=False)  # reloading a zoo student: the KD student's cell


def _maskable(module: nn.Module) -> int:
    """Layers supermask() masks: every Conv2d and Linear, plus each attention's packed input projection."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()) + sum(
        isinstance(m, nn.MultiheadAttention) for m in module.modules())


@by_model
def test_supermask_backbone(runs):
    hook, x_task1, run = runs.get("supsup")
    R = run.summary["accuracy_matrix"]
    assert len(R) == TASKS and R[1][0] == R[0][0]  # no forgetting: task 1's accuracy is unchanged after task 2
    assert torch.equal(run.predict_task(x_task1, 0), hook.logits)  # ... and so are its logits
    net = run.method.net
    assert len(net.masked_layers()) == _maskable(runs.zoo.build(CLASSES // TASKS))  # converted (and checked) in full
    assert not any(p.requires_grad for p in net.body.parameters())


@by_model
def test_features_by_layer_name(runs):
    zoo, x = runs.zoo, runs.test[0][:3]
    net, fac = runs.get("kf")  # the KF run's teacher, its features read from the named layer
    spec = {"path": OBJECTS.put(net, "teacher"), "normalize": "none", "features": zoo.layer}
    frozen = load_frozen(spec, None, x, "method.teacher")
    seen = []
    reference = copy.deepcopy(net)
    dict(reference.named_modules())[zoo.layer].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        reference(x)
        assert torch.allclose(frozen.features(x), seen[0].flatten(1), atol=1e-5)
    # the KF run's InfoMax projector takes the named layer's features
    assert fac.method.projectors[0][0].in_features == seen[0].flatten(1).shape[1]


def test_a_named_conv_head_serves_as_the_students_head(tmp_path):
    """A student whose classifier is a 1x1 Conv2d (timm's ResNetV2 head.fc), named with head:, trains its own head."""
    def conv_head_net(num_classes):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, num_classes, 1), nn.Flatten())

    (x, y), test = _data()
    run = kbricks.distill((x, y), test=test, method="sskt", sources=[nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))],
                          student={"name": conv_head_net, "head": "2"}, epochs=1, batch_size=16, progress="off",
                          overrides=STEPS, run_dir=tmp_path / "r")
    assert run.predict(test[0]).shape == (len(test[0]), CLASSES)
    # the head computes the network's own output from its features, and trains the network's own 1x1 convolution
    from kbricks.models.wrappers import ForeignClassifier

    net = conv_head_net(4)
    wrapped = ForeignClassifier(net, (3, 32, 32), 4, "student", head="2")
    xx = torch.rand(2, 3, 32, 32)
    assert torch.allclose(wrapped.head(wrapped.features(xx)), net(xx), atol=1e-6)
    wrapped.head(wrapped.features(xx)).sum().backward()
    assert net[2].weight.grad.abs().sum() > 0


# ---- a trained zoo teacher -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_trained_zoo_teacher_factorizes_close_to_its_accuracy(tmp_path):
    """timm resnet18 trained on digits (16 px), then KF into bricks: the assembled network against the teacher."""
    import torch.nn.functional as F

    from kbricks.data import load_dataset

    d = load_dataset("digits")
    up = lambda x: F.interpolate(x, size=16, mode="bilinear", align_corners=False)  # noqa: E731
    train, test = (up(d.train.x), d.train.y), (up(d.test.x), d.test.y)
    teacher = kbricks.distill(train, test=test, method="supervised", student="timm:resnet18", epochs=10, lr=0.05,
                              run_dir=tmp_path / "teacher", progress="off", overrides=["train.plots=false"])
    teacher_acc = teacher.accuracy(*test)
    fac = kbricks.factorize(teacher.run_dir, train, test=test, tasks=2, epochs=12, lr=0.05, run_dir=tmp_path / "kf",
                            progress="off", overrides=["train.plots=false"])
    assembled_acc = fac.assembled_accuracy(*test)
    print(f"timm:resnet18 teacher {100 * teacher_acc:.2f} %, assembled bricks {100 * assembled_acc:.2f} %")
    assert teacher_acc >= 0.9
    assert assembled_acc >= teacher_acc - 0.05


# ---- the table in docs/byo.md ----------------------------------------------------------------------------------------


def test_the_table_script_reads_every_outcome_and_rewrites_only_its_block(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo_matrix", Path(__file__).parent.parent / "scripts" / "zoo_matrix.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    junit = tmp_path / "r.xml"
    junit.write_text('<testsuites><testsuite time="3.5">'
                     '<testcase name="test_kd_student[timm:a]" time="1.0"/>'
                     '<testcase name="test_kd_teacher[timm:a]" time="0.5"><failure message="AssertionError: x | y&#10;more"/></testcase>'
                     '<testcase name="test_sskt_student[timm:a]" time="0.5"><skipped type="pytest.xfail" message="src bug: z"/></testcase>'
                     '<testcase name="test_kf_teacher[tv:b]" time="1.5"><skipped type="pytest.skip" message="n/a: no head"/></testcase>'
                     '<testcase name="test_the_table_script[x]" time="9"/>'
                     '</testsuite></testsuites>')
    cells, seconds, total = script.read_results(junit)
    assert cells == {"timm:a": {"test_kd_student": "pass", "test_kd_teacher": "**FAIL**: AssertionError: x \\| y",
                                "test_sskt_student": "xfail: src bug: z"}, "tv:b": {"test_kf_teacher": "n/a: no head"}}
    assert seconds == {"timm:a": 2.0, "tv:b": 1.5} and total == 3.5
    table = script.render(cells, seconds, total)
    assert "| `timm:a` | not run | FAIL [1] | pass | not run | xfail [2] |" in table and "[3] n/a: no head." in table
    assert "| `tv:b` | n/a [3] |" in table and "[1] **FAIL**: AssertionError: x \\| y." in table
    doc = tmp_path / "byo.md"
    doc.write_text("# Bring your own network\n\ntext\n")
    script.write_table(doc, "first")
    script.write_table(doc, "second")
    text = doc.read_text()
    assert text.startswith("# Bring your own network\n\ntext\n\n## Zoo matrix") and text.count("## Zoo matrix") == 1
    assert f"{script.START}\nsecond\n{script.END}\n" in text and "first" not in text
    assert script.main(["--junit", str(junit), "--doc", str(doc)]) == 1  # a failed cell

"""The Python API for networks and data you already have in Python (docs/api.md).

Each call builds an ordinary run config whose networks and data are your objects (held in the process's object
store under ``memory:`` keys, so they go through exactly the code path of a network or dataset named in YAML),
trains it with the engine, and returns a :class:`Run` you can keep: its run directory (config, metrics, model
files), the trained network, and for factorization the bricks.

    fac = kbricks.factorize(my_teacher, (x_train, y_train), test=(x_test, y_test), tasks=2)
    net = fac.assemble()                       # bricks -> one network, no fine-tuning
    kd = kbricks.distill((x, y), teacher=my_teacher, student=MyStudent)
    cl = kbricks.learn_continually(MyBackbone, (x, y), scenario="split", num_tasks=5)

Data are ``(x, y)`` tensors or numpy arrays, any map-style ``torch.utils.data.Dataset``, a ``DataSplits``, or the
name of a registered dataset; values are used as given (never rescaled). Networks are ``nn.Module`` objects,
classes or factories (called with the data's shape arguments they name), any callable returning logits, or
anything a config accepts (a registered name, a kbricks run, a TorchScript file, an import path). A teacher or
source object takes the data exactly as you pass them, unless you state another convention (``teacher_normalize``
or a spec dict with ``normalize`` / ``input``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn

from .core.hooks import Hook
from .core.metrics import argmax_accuracy
from .data import DataSplits, load_dataset, python_splits
from .engine.experiment import build_config
from .engine.run import run_training
from .errors import ConfigError
from .methods.kf.bricks import assemble
from .models.spec import NetworkSpec
from .registry import OBJECTS

Data = Any  # (x, y) | Dataset | DataSplits | dataset name | data config dict
Network = Any  # nn.Module | class / factory | callable | spec string | spec dict


# ---- what a call returns ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """A finished run: where it lives, what it scored, and the trained network (``model``: the student, KF's factor
    networks, or the continual strategy), in eval mode (call ``.train()`` on it to train it further yourself)."""

    run_dir: Path
    summary: Dict[str, Any]
    model: nn.Module
    method: nn.Module = field(repr=False)
    transform: Any = field(repr=False)
    device: torch.device = field(repr=False, default=torch.device("cpu"))

    def __post_init__(self) -> None:
        # what the API hands back is for inference: calling it must not update BatchNorm statistics (or drop units)
        self.method.eval()
        self.model.eval()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as the run's networks take them (the run's input normalisation, no augmentation)."""
        return self.transform(torch.as_tensor(x).float().to(self.device), train=False)

    @torch.no_grad()
    def predict(self, x: Any, batch_size: int = 512) -> torch.Tensor:
        """Logits (or scores) of the trained method on raw inputs ``x`` (as you passed the data)."""
        self.method.eval()
        x = torch.as_tensor(x).float()
        return torch.cat([_single(self.method.predict(self.normalize(x[i:i + batch_size]))).cpu() for i in range(0, len(x), batch_size)])

    def accuracy(self, x: Any, y: Any) -> float:
        return accuracy(self.predict, x, y)


@dataclass
class Factorization(Run):
    """A KF run: ``bricks`` maps ``ckn`` and every task name to its brick manifest."""

    bricks: Dict[str, Path] = field(default_factory=dict)

    def assemble(self, tasks: Optional[Sequence[str]] = None) -> nn.Module:
        """The CKN plus the TSNs of ``tasks`` (default: all) as one network, without fine-tuning. It takes raw inputs
        (the data as you passed them) and can be saved (``kbricks.save_assembled``) or exported (``kbricks.export``)."""
        names = [n for n in self.bricks if n != "ckn"] if tasks is None else list(tasks)
        unknown = [n for n in names if n not in self.bricks or n == "ckn"]
        if unknown:
            raise ConfigError(f"no TSN brick for tasks {unknown}; the run has {[n for n in self.bricks if n != 'ckn']}")
        return assemble(self.bricks["ckn"], [self.bricks[n] for n in names])

    @torch.no_grad()
    def assembled_accuracy(self, x: Any, y: Any, tasks: Optional[Sequence[str]] = None) -> float:
        """Accuracy of the assembled network on raw inputs ``x`` (over the union of its tasks' classes)."""
        return accuracy(self.assemble(tasks).to(self.device), x, y)  # it carries the run's input normalisation


TASK_INFERENCE = ("one_shot", "binary", "refit_uniform", "refit_nearest")


@dataclass(frozen=True)
class TaskFreePrediction:
    """What :meth:`ContinualRun.predict` returns: ``labels`` [N] (class ids *within the inferred task*, 0 ..
    its num_classes-1), ``global_labels`` [N] (the same predictions as the dataset's class ids: on a split scenario
    task 1's label 0 is the dataset's class 2; on permuted / rotated scenarios they equal ``labels``), ``tasks`` [N]
    (the task inferred for each image's group) and ``logits`` [N, outputs] (the run's full output width; only the
    inferred task's first ``num_classes`` columns are its classes). Unpacks as ``labels, tasks = ...``."""

    labels: torch.Tensor
    tasks: torch.Tensor
    logits: torch.Tensor = field(repr=False)
    global_labels: Optional[torch.Tensor] = None

    def __iter__(self):
        return iter((self.labels, self.tasks))


def global_class_ids(scenario, task: int, labels: torch.Tensor) -> torch.Tensor:
    """Task ``task``'s labels as the dataset's class ids (unchanged when the task keeps the dataset's labels)."""
    classes = getattr(scenario[task], "classes", None)
    if classes is None:
        return labels.clone()
    return torch.tensor(classes, dtype=torch.long)[labels]


@dataclass
class ContinualRun(Run):
    """A continual run: ``summary`` holds the accuracy matrix and forgetting; ``predict_task(x, t)`` classifies
    with task ``t``'s mask; ``predict(x)`` infers the task first (no task id needed)."""

    @torch.no_grad()
    def predict_task(self, x: Any, task: int, batch_size: int = 512) -> torch.Tensor:
        self.method.eval()
        x = torch.as_tensor(x).float()
        return torch.cat([self.method.predict_task(self.normalize(x[i:i + batch_size]), task).cpu() for i in range(0, len(x), batch_size)])

    def predict(self, x: Any, infer: str = "one_shot", group: Optional[int] = None) -> TaskFreePrediction:
        """Labels of raw inputs ``x`` without a task id. The images of a group are assumed to come from one task
        (SupSup's setting): ``group=None`` treats all of ``x`` as one batch, ``group=n`` infers a task for every ``n``
        consecutive images (``group=1``: every image on its own). ``infer``: ``one_shot`` or ``binary`` (SupSup's
        gradient rules on the superposition of the stored masks), ``refit_uniform`` / ``refit_nearest`` (ImpressLearn:
        coefficients re-fit to the group by entropy minimisation; the labels come from the re-fit combination, the
        task is the one whose stored coefficients are nearest). Measured accuracy: docs/api.md."""
        s = self.method
        if not getattr(s, "supports_task_inference", lambda: False)():
            raise ConfigError(f"{type(s).__name__} cannot infer the task (no per-task masks to compare): use predict_task(x, task)")
        if infer not in TASK_INFERENCE:
            raise ConfigError(f"predict: infer={infer!r} is not a task-inference rule; use one of {', '.join(TASK_INFERENCE)}")
        if infer.startswith("refit_") and s.task_coefficients() is None:
            raise ConfigError(f"predict: infer={infer!r} re-fits ImpressLearn's coefficients; {type(s).__name__} stores one mask per task "
                              "(use one_shot or binary)")
        if group is not None and group < 1:
            raise ConfigError(f"predict: group={group} must be >= 1 (images per inferred task) or None (all of x)")
        from .continual.inference import infer_task, refit_coefficients

        x = torch.as_tensor(x).float()
        n = len(x) if group is None else group
        inference = getattr(getattr(s, "cfg", None), "inference", None)
        steps, lr = (inference.refit_steps, inference.refit_lr) if inference is not None else (25, 0.01)
        objective = inference.objective if inference is not None else "entropy"
        s.eval()
        labels, global_labels, tasks, logits = [], [], [], []
        for i in range(0, len(x), max(1, n)):
            xb = self.normalize(x[i:i + n])
            if infer.startswith("refit_"):
                out, task = refit_coefficients(s, xb, infer[len("refit_"):], steps, lr)
            else:
                task = infer_task(s, xb, infer, objective)
                with torch.no_grad():
                    out = s.predict_task(xb, task)
            out = out.detach().cpu()
            labels.append(out[:, : s.task_classes[task]].argmax(1))
            global_labels.append(global_class_ids(s.scenario, task, labels[-1]))
            tasks.append(torch.full((len(xb),), task, dtype=torch.long))
            logits.append(out)
        if not labels:
            empty = torch.zeros(0, dtype=torch.long)
            return TaskFreePrediction(empty, empty.clone(), torch.zeros(0, 0), empty.clone())
        return TaskFreePrediction(torch.cat(labels), torch.cat(tasks), torch.cat(logits), torch.cat(global_labels))


def _single(out):
    if isinstance(out, (list, tuple)):
        raise ConfigError("this network has one output per task; score each task's output separately")
    return out


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: Any, y: Any, batch_size: int = 512) -> float:
    """Fraction of ``x`` whose argmax of ``predict(batch)`` equals ``y`` (any network or function returning logits)."""
    return argmax_accuracy(predict, x, y, batch_size)


# ---- building the config ---------------------------------------------------------------------------------------


def _data_config(data: Data, test: Data, classes, test_fraction: float, split_seed: int, normalize: bool,
                 augment: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    aug = {"normalize": normalize, **(augment or {})}
    if isinstance(data, str):
        if test is not None:
            raise ConfigError("test data go with data given as arrays or a Dataset, not with a dataset name")
        return {"name": data, "augment": aug}
    if isinstance(data, dict):
        return {**data, "augment": {**aug, **data.get("augment", {})}}
    splits = python_splits(data, test, classes, test_fraction, split_seed)
    return {"name": "in_memory", "kwargs": {"ref": OBJECTS.put(splits, "data")}, "augment": aug}


def _splits_of(data_cfg: Dict[str, Any]) -> DataSplits:
    if data_cfg["name"] == "in_memory":
        return OBJECTS.get(data_cfg["kwargs"]["ref"], "data")
    kwargs = dict(data_cfg.get("kwargs", {}))
    if data_cfg.get("root") is not None:
        kwargs["root"] = data_cfg["root"]
    return load_dataset(data_cfg["name"], **kwargs)


def _frozen_ref(net: Network, kind: str, normalize=None) -> Union[str, Dict[str, Any]]:
    """A teacher / source for a method config. Python objects take the data as given unless ``normalize`` says
    otherwise; a path keeps the convention it states (a TorchScript file or import path must state one)."""
    if isinstance(net, NetworkSpec):
        return net.model_dump(mode="json", exclude_defaults=True)
    if isinstance(net, dict):
        spec = dict(net)
        if not isinstance(spec.get("path"), (str, os.PathLike)):
            spec["path"] = OBJECTS.put(spec.get("path"), kind)
        return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in spec.items()}
    if isinstance(net, (str, os.PathLike)):
        path = os.fspath(net)
        return {"path": path, "normalize": normalize} if normalize is not None else path
    if isinstance(net, type):
        raise ConfigError(f"{kind}: got the class {net.__name__}; give the trained network object")
    if not (isinstance(net, nn.Module) or callable(net)):
        raise ConfigError(f"{kind}: a {type(net).__name__} is neither a network nor a callable returning logits")
    ref: Dict[str, Any] = {"path": OBJECTS.put(net, kind)}
    if normalize is not None:
        ref["normalize"] = normalize
    return ref


def _teacher_ref(teacher: Network, normalize, check: bool) -> Union[str, Dict[str, Any]]:
    """A teacher for a method config; ``check=False`` skips the check of its input convention on the training data."""
    ref = _frozen_ref(teacher, "teacher", normalize)
    if check:
        return ref
    return {**({"path": ref} if isinstance(ref, str) else ref), "check": False}


def _model_config(model: Network, kind: str, default: Dict[str, Any]) -> Dict[str, Any]:
    """A trainable network: a registered name or spec string, ``{name, kwargs}``, or a Python class / factory /
    module (a module is copied; a class or factory gives a fresh, seeded initialisation each run)."""
    if model is None:
        return dict(default)
    if isinstance(model, dict):
        out = dict(model)
        if not isinstance(out.get("name"), str):
            out["name"] = OBJECTS.put(out.get("name"), kind)
        return out
    if isinstance(model, (str, os.PathLike)):
        return {"name": os.fspath(model)}
    if isinstance(model, nn.Module) or callable(model):
        return {"name": OBJECTS.put(model, kind)}
    raise ConfigError(f"{kind}: a {type(model).__name__} is not a model name, a network, a class or a factory")


def _tasks_config(tasks) -> Optional[Dict[str, Any]]:
    if tasks is None:
        return None
    if isinstance(tasks, int):
        return {"split": tasks}
    tasks = list(tasks)
    if tasks and all(isinstance(t, str) for t in tasks):
        return {"latents": tasks}
    return {"partition": [list(map(int, t)) for t in tasks]}


def _check_other_classes(splits: DataSplits, tasks: Optional[Dict[str, Any]]) -> None:
    """A new TSN learns to answer "not mine" from samples of the classes outside its task; data holding only the new
    classes would give bricks that claim every input once assembled with the old ones."""
    if not tasks or "partition" not in tasks:
        return
    new = {c for part in tasks["partition"] for c in part}
    present = set(torch.unique(splits.train.y).tolist())
    if present and present <= new:
        raise ConfigError(f"extend: the training data hold only the new classes {sorted(present)}; give samples of the other "
                          "classes too, labelled by their global ids (the new bricks learn 'not mine' from them); do not relabel")


def _is_flat(splits: DataSplits) -> bool:
    return splits.train.x.dim() == 2


class _Keep(Hook):
    """Holds on to the trained method and the experiment at the end of the run."""

    def on_fit_end(self, state, summary) -> None:
        self.state = state


def _run(cfg_dict: Dict[str, Any], overrides: Sequence[str], run_dir, resume: bool, overwrite: bool):
    cfg = build_config(cfg_dict, list(overrides))
    keep = _Keep()
    summary = run_training(cfg, Path(run_dir) if run_dir is not None else None, resume=resume, hooks=[keep], overwrite=overwrite)
    return summary, keep.state.method, keep.state.exp, Path(summary["run_dir"])


def _common(name, seed, epochs, batch_size, lr, optimizer, weight_decay, device, progress, out_dir) -> Dict[str, Any]:
    optim: Dict[str, Any] = {"name": optimizer}
    if lr is not None:
        optim["lr"] = lr
    if weight_decay is not None:
        optim["weight_decay"] = weight_decay
    train = {"epochs": epochs, "batch_size": batch_size, "device": device, "progress": progress}
    return {"name": name, "seed": seed, "out_dir": str(out_dir), "optim": optim, "train": train}


# ---- the calls ---------------------------------------------------------------------------------------------------


_TASKS_DEFAULT = object()  # factorize(tasks=...) not given: 2 class groups for one teacher, each teacher's classes for several


def _teacher_entries(teachers: Sequence[Any], normalize) -> list:
    """``teachers=[...]`` of factorize / extend -> method.teachers entries: each a dict ``{teacher (or path), classes,
    tasks, name}`` or a pair ``(teacher, classes)``."""
    entries = []
    for i, t in enumerate(teachers):
        if isinstance(t, (tuple, list)) and len(t) == 2:
            t = {"teacher": t[0], "classes": t[1]}
        if not isinstance(t, dict):
            raise ConfigError(f"teachers[{i}]: give {{'teacher': network, 'classes': [global class ids of its outputs]}} or a "
                              f"(network, classes) pair, not a {type(t).__name__}")
        unknown = set(t) - {"teacher", "path", "classes", "tasks", "name"}
        if unknown or ("teacher" in t) == ("path" in t):
            raise ConfigError(f"teachers[{i}]: keys are teacher (or path), classes, tasks, name; got {sorted(t)}")
        net = t.get("teacher", t.get("path"))
        entry = {"path": _frozen_ref(net, "teacher", normalize)}
        entry.update({k: ([list(map(int, p)) for p in v] if k == "tasks" else list(map(int, v)) if k == "classes" else v)
                      for k, v in t.items() if k in ("classes", "tasks", "name") and v is not None})
        entries.append(entry)
    return entries


def _tsn_config(tsn: Network, flat: bool) -> Dict[str, Any]:
    """The TSN's model config: ``tsn`` as given, else a small network for the data (an MLP for feature vectors, a
    small CNN for images)."""
    default = {"name": "mlp", "kwargs": {"hidden": [64]}} if flat else {"name": "small_cnn", "kwargs": {"widths": [16, 32]}}
    return _model_config(tsn, "tsn", default)


def factorize(teacher: Network = None, data: Data = None, *, teachers: Optional[Sequence[Any]] = None, test: Data = None,
              tasks: Any = _TASKS_DEFAULT, ckn: Network = None, tsn: Network = None,
              teacher_normalize=None, check_teacher: bool = True, classes: Optional[Sequence[str]] = None, test_fraction: float = 0.2,
              split_seed: int = 0, normalize: bool = True, augment: Optional[Dict[str, Any]] = None, options: Optional[Dict[str, Any]] = None,
              epochs: int = 20, batch_size: int = 64, lr: Optional[float] = None, optimizer: str = "sgd",
              weight_decay: Optional[float] = None, seed: int = 0, name: str = "kf", run_dir=None, out_dir="runs",
              device: str = "auto", progress: str = "auto", overrides: Sequence[str] = (), resume: bool = False,
              overwrite: bool = False) -> Factorization:
    """Knowledge Factorization of ``teacher`` into a common-knowledge network (CKN) and one task-specific network
    (TSN) per task, written as bricks in ``<run_dir>/bricks``.

    ``tasks``: a number of consecutive class groups (2: {0-4}, {5-9} for ten classes), a class partition
    ``[[0, 1, 2], [3, 4]]``, or latent names. ``ckn`` / ``tsn``: trainable networks (default: small CNNs for
    images, MLPs for feature vectors). ``options``: any other KF option (``temperature``, ``beta``, ``tsn_dim`` ...).

    ``teachers=[{"teacher": net_a, "classes": [0, 1, 2, 3, 4]}, (net_b, [5, 6, 7, 8, 9])]`` instead of ``teacher``:
    amalgamation (method ``kf_amalgamate``): one CKN for all teachers, one TSN per teacher (or per entry of its
    ``tasks``), each distilled from its own teacher; ``classes`` maps the teacher's outputs to the data's labels.
    """
    if data is None:
        raise ConfigError("factorize needs data: (x, y) tensors, a Dataset, DataSplits or a dataset name")
    if (teacher is None) == (teachers is None):
        raise ConfigError("factorize needs a teacher, or teachers=[...] to amalgamate several (not both)")
    if tasks is _TASKS_DEFAULT:
        tasks = 2 if teachers is None else None
    elif tasks is None:
        raise ConfigError("factorize needs tasks: a number of class groups, a class partition, or latent names")
    data_cfg = _data_config(data, test, classes, test_fraction, split_seed, normalize, augment)
    flat = _is_flat(_splits_of(data_cfg))
    ckn_default = {"name": "mlp", "kwargs": {"hidden": [256, 128]}} if flat else {"name": "small_cnn", "kwargs": {"widths": [32, 64]}}
    data_cfg["tasks"] = _tasks_config(tasks)
    cfg = _common(name, seed, epochs, batch_size, lr, optimizer, weight_decay, device, progress, out_dir)
    if teachers is None:
        method_cfg = {"name": "kf", "teacher": _teacher_ref(teacher, teacher_normalize, check_teacher)}
    else:
        method_cfg = {"name": "kf_amalgamate", "teachers": _teacher_entries(teachers, teacher_normalize)}
    cfg.update(data=data_cfg, model=_model_config(ckn, "ckn", ckn_default),
               method={**method_cfg, "tsn": _tsn_config(tsn, flat), **(options or {})})
    return _factorization(cfg, overrides, run_dir, resume, overwrite)


def _factorization(cfg: Dict[str, Any], overrides, run_dir, resume: bool, overwrite: bool) -> Factorization:
    summary, method, exp, path = _run(cfg, overrides, run_dir, resume, overwrite)
    bricks = {"ckn": path / "bricks" / "ckn.json", **{t.name: path / "bricks" / f"tsn-{t.name}.json" for t in exp.tasks}}
    return Factorization(path, summary, method.export_module(), method, exp.transform, exp.device, bricks)


def extend(ckn_brick: Union[str, os.PathLike], teacher: Network, data: Data, *, tasks: Any = None, teacher_classes: Optional[Sequence[int]] = None,
           test: Data = None, tsn: Network = None, teacher_normalize=None, classes: Optional[Sequence[str]] = None,
           test_fraction: float = 0.2, split_seed: int = 0, augment: Optional[Dict[str, Any]] = None,
           options: Optional[Dict[str, Any]] = None, epochs: int = 20, batch_size: int = 64, lr: Optional[float] = None,
           optimizer: str = "sgd", weight_decay: Optional[float] = None, seed: int = 0, name: str = "kf-extend", run_dir=None,
           out_dir="runs", device: str = "auto", progress: str = "auto", overrides: Sequence[str] = (), resume: bool = False,
           overwrite: bool = False) -> Factorization:
    """New TSN bricks for an existing CKN brick (``<run>/bricks/ckn.json``), which stays frozen, bit for bit: only the
    TSNs of ``tasks`` train, distilled from ``teacher`` (the one the CKN was made with, or a new one; its outputs are
    the data's classes ``teacher_classes``, default 0..outputs-1). The data are labelled in the global label space and
    normalised as the CKN was. The new bricks bind to the CKN's fingerprint: they assemble with the bricks made with it
    before (``kbricks.assemble(ckn, [old..., new...])``). ``tasks``: a class partition ``[[5, 6, 7, 8, 9]]``, a number
    of class groups, or None (one task of all classes)."""
    from .methods.kf.bricks import load_brick

    manifest, _ = load_brick(ckn_brick)
    if manifest["kind"] != "ckn":
        raise ConfigError(f"extend: {ckn_brick} is a {manifest['kind']} brick; give the CKN brick (bricks/ckn.json)")
    arch = manifest["architecture"]
    data_cfg = _data_config(data, test, classes, test_fraction, split_seed, manifest.get("normalize") is not None, augment)
    data_cfg["tasks"] = _tasks_config(tasks)
    splits = _splits_of(data_cfg)
    _check_other_classes(splits, data_cfg["tasks"])
    flat = _is_flat(splits)
    method_cfg: Dict[str, Any] = {"name": "kf_extend", "ckn": os.fspath(ckn_brick),
                                  "teacher": _teacher_ref(teacher, teacher_normalize, True), "tsn": _tsn_config(tsn, flat)}
    if teacher_classes is not None:
        method_cfg["teacher_classes"] = [int(c) for c in teacher_classes]
    cfg = _common(name, seed, epochs, batch_size, lr, optimizer, weight_decay, device, progress, out_dir)
    cfg.update(data=data_cfg, model={"name": arch["name"], "kwargs": arch.get("kwargs", {})}, method={**method_cfg, **(options or {})})
    return _factorization(cfg, overrides, run_dir, resume, overwrite)


DISTILLATION = ("kd", "sskt", "dml", "maxl", "supervised")


def distill(data: Data, *, method: str = "kd", teacher: Network = None, sources: Optional[Sequence[Network]] = None,
            student: Network = None, test: Data = None, teacher_normalize=None, check_teacher: bool = True,
            classes: Optional[Sequence[str]] = None,
            test_fraction: float = 0.2, split_seed: int = 0, normalize: bool = True, augment: Optional[Dict[str, Any]] = None,
            options: Optional[Dict[str, Any]] = None, epochs: int = 20, batch_size: int = 64, lr: Optional[float] = None,
            optimizer: str = "sgd", weight_decay: Optional[float] = None, seed: int = 0, name: Optional[str] = None, run_dir=None,
            out_dir="runs", device: str = "auto", progress: str = "auto", overrides: Sequence[str] = (), resume: bool = False,
            overwrite: bool = False) -> Run:
    """Train ``student`` on ``data`` with ``method``: ``kd`` (needs ``teacher``), ``sskt`` (needs ``sources``: frozen
    classifiers of any label space, each a network or a spec dict with its ``normalize`` / ``input`` conversion),
    ``dml`` (peers of the student's architecture), ``maxl`` (auxiliary labels), or ``supervised``. ``options``: the
    method's other options (``temperature``, ``alpha``, ``peers``, ``psi`` ...). ``Run.model`` is the student."""
    if method not in DISTILLATION:
        raise ConfigError(f"distill: method must be one of {DISTILLATION}, got {method!r}")
    params: Dict[str, Any] = {"name": method, **(options or {})}
    if method == "kd":
        if teacher is None:
            raise ConfigError("distill(method='kd') needs a teacher")
        params["teacher"] = _teacher_ref(teacher, teacher_normalize, check_teacher)
    elif teacher is not None:
        raise ConfigError(f"method {method!r} takes no teacher" + (" (SSKT takes sources=[...])" if method == "sskt" else ""))
    if method == "sskt":
        if not sources:
            raise ConfigError("distill(method='sskt') needs sources=[...]")
        params["sources"] = [_frozen_ref(s, "source", teacher_normalize) for s in sources]
    elif sources:
        raise ConfigError(f"method {method!r} takes no sources")
    data_cfg = _data_config(data, test, classes, test_fraction, split_seed, normalize, augment)
    flat = _is_flat(_splits_of(data_cfg))
    default = {"name": "mlp", "kwargs": {"hidden": [256, 128]}} if flat else {"name": "small_cnn", "kwargs": {"widths": [32, 64]}}
    cfg = _common(name or method, seed, epochs, batch_size, lr, optimizer, weight_decay, device, progress, out_dir)
    cfg.update(data=data_cfg, model=_model_config(student, "student", default), method=params)
    summary, m, exp, path = _run(cfg, overrides, run_dir, resume, overwrite)
    return Run(path, summary, m.export_module(), m, exp.transform, exp.device)


def learn_continually(backbone: Network, data: Data, *, method: str = "supsup", scenario: Union[str, Dict[str, Any]] = "split",
                      num_tasks: int = 5, density: float = 0.5, test: Data = None, classes: Optional[Sequence[str]] = None,
                      test_fraction: float = 0.2, split_seed: int = 0, normalize: bool = True, options: Optional[Dict[str, Any]] = None,
                      epochs: int = 10, batch_size: int = 64, lr: Optional[float] = 0.01, optimizer: str = "adam",
                      weight_decay: Optional[float] = 0.0, seed: int = 0, name: Optional[str] = None, run_dir=None, out_dir="runs",
                      device: str = "auto", progress: str = "auto", overrides: Sequence[str] = (), resume: bool = False,
                      overwrite: bool = False) -> ContinualRun:
    """SupSup or ImpressLearn on a supermasked copy of ``backbone`` (every ``nn.Linear`` / ``nn.Conv2d`` masked over
    frozen signed constants; BatchNorm per task): the tasks of ``scenario`` (``split``, ``permuted``, ``rotated``,
    or ``{name, ...arguments}``) learned one after another. The backbone must output as many logits as the largest
    task has classes (a class or factory receives ``num_classes``). ``summary["accuracy_matrix"][i][j]``: accuracy
    on task j after learning task i."""
    if method not in ("supsup", "impresslearn"):
        raise ConfigError(f"learn_continually: method must be supsup or impresslearn, got {method!r}")
    if backbone is None:
        raise ConfigError("learn_continually needs a backbone (a network, class, factory or model name)")
    data_cfg = _data_config(data, test, classes, test_fraction, split_seed, normalize, None)
    data_cfg["scenario"] = {"name": scenario, "num_tasks": num_tasks} if isinstance(scenario, str) else dict(scenario)
    cfg = _common(name or method, seed, epochs, batch_size, lr, optimizer, weight_decay, device, progress, out_dir)
    cfg["optim"]["schedule"] = "constant"
    cfg.update(data=data_cfg, model=_model_config(backbone, "backbone", {}), method={"name": method, "density": density, **(options or {})})
    summary, strategy, exp, path = _run(cfg, overrides, run_dir, resume, overwrite)
    return ContinualRun(path, summary, strategy, strategy, exp.transform, exp.device)


__all__ = ["Run", "Factorization", "ContinualRun", "TaskFreePrediction", "accuracy", "distill", "extend", "factorize", "learn_continually"]

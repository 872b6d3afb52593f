"""The experiment factory: a checked config -> data, tasks, input transform and the method, ready to train.

``build_config`` / ``load_config`` are the config schema (``kbricks.config``) plus every check that needs the
registries: dataset, scenario and model names and their arguments, the method's own options, and whether the
method fits the run (a continual strategy needs ``data.scenario`` and vice versa).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from pydantic import ValidationError

from .. import continual as _continual  # noqa: F401  (registers the continual strategies)
from .. import methods as _methods  # noqa: F401  (registers the methods)
from ..config import DataConfig, RunConfig, format_validation_error, parse_config, read_yaml
from ..core.io import first_line
from ..core.seeding import pick_device, seed_everything
from ..data import (
    DATASETS,
    SCENARIOS,
    ArrayDataset,
    BatchAugment,
    DataSplits,
    Task,
    TaskData,
    build_scenario,
    build_tasks,
    channel_stats,
)
from ..data.validate import relabel_splits, validate_splits
from ..errors import ConfigError, DataError, KbricksError
from ..methods.base import METHODS, Method, MethodContext
from ..models import MODELS
from ..models.foreign import check_network_name
from ..registry import OBJECTS, check_kwargs


@dataclass
class Experiment:
    cfg: RunConfig
    data: DataSplits
    tasks: List[Task]
    method: Method
    transform: BatchAugment
    device: torch.device
    scenario: Optional[List[TaskData]] = None  # continual runs: the task sequence


# ---- config checks -------------------------------------------------------------------------------------------

MODEL_SHAPE_ARGS = ("num_classes", "in_channels", "image_size")


def build_config(data: dict, overrides: Sequence[str] = ()) -> RunConfig:
    """A checked config from a dict. Python objects where a network is named (an ``nn.Module`` teacher, a model
    class or factory, any callable returning logits) are held in the process's object store under a ``memory:`` key."""
    cfg = parse_config(hold_networks(data), overrides)
    validate(cfg)
    return cfg


NETWORK_KEYS = ("teacher", "sources", "name", "path")  # where a config names a network (model.name, method.tsn.name ...)


def hold_networks(value, key: str = ""):
    """A copy of a config dict whose network entries that are Python objects are replaced by object-store keys."""
    if isinstance(value, dict):
        return {k: hold_networks(v, k) if k in NETWORK_KEYS or isinstance(v, (dict, list, tuple)) else v for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [hold_networks(v, key) for v in value]
    if key in NETWORK_KEYS and not isinstance(value, (str, int, float, bool, type(None))) and (isinstance(value, torch.nn.Module) or callable(value)):
        return OBJECTS.put(value, key)
    return value


def load_config(path, overrides: Sequence[str] = ()) -> RunConfig:
    return build_config(read_yaml(Path(path)), overrides)


def validate(cfg: RunConfig) -> None:
    """Fail at load time (not mid-run) on unknown names, constructor arguments or method options."""
    d = cfg.data
    data_kwargs = dict(d.kwargs, **({"root": d.root} if d.root is not None else {}))
    check_kwargs(DATASETS.get(d.name), data_kwargs, f"dataset {d.name!r} (data.kwargs / data.root)")
    check_kwarg_types(DATASETS.get(d.name), d.kwargs, "data.kwargs")
    if d.scenario is not None:
        check_kwargs(SCENARIOS.get(d.scenario.name), {"data": None, **d.scenario.kwargs()}, f"scenario {d.scenario.name!r} (data.scenario)")
        check_kwarg_types(SCENARIOS.get(d.scenario.name), d.scenario.kwargs(), "data.scenario")
    reserved = sorted(set(MODEL_SHAPE_ARGS) & set(cfg.model.kwargs))
    if reserved:
        raise ConfigError(f"model.kwargs must not set {reserved}: they are taken from the data")
    if cfg.model.name in MODELS:
        check_kwargs(MODELS.get(cfg.model.name), {**{k: 1 for k in MODEL_SHAPE_ARGS}, **cfg.model.kwargs}, f"model {cfg.model.name!r} (model.kwargs)")
        check_kwarg_types(MODELS.get(cfg.model.name), cfg.model.kwargs, "model.kwargs")
    else:
        check_network_name(cfg.model.name, cfg.model.kwargs, "model.name")
    method_params(cfg)
    continual = "continual" in METHODS.tags(cfg.method.name)
    if continual and d.scenario is None:
        raise ConfigError(f"method {cfg.method.name!r} is a continual strategy: set data.scenario (e.g. {{name: permuted, num_tasks: 5}})")
    if not continual and d.scenario is not None:
        raise ConfigError(f"data.scenario is set but method {cfg.method.name!r} is not a continual strategy "
                          f"(continual methods: {', '.join(METHODS.names(tag='continual'))})")


def check_kwarg_types(factory, kwargs: dict, prefix: str) -> None:
    """Each argument against the factory's type annotation (or the type of its default), so ``hidden: abc`` fails
    at load time naming ``model.kwargs.hidden`` instead of deep inside a constructor. Arguments without a usable
    annotation or default are left to the constructor (see :func:`build_experiment`)."""
    import inspect
    import typing

    from pydantic import TypeAdapter

    params = inspect.signature(factory).parameters
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # unresolvable annotations in user code: fall back to the defaults' types
        hints = {}
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is None and key in params:
            default = params[key].default
            if type(default) in (bool, int, float, str):
                hint = float if type(default) is float else type(default)
        if hint is None or hint is typing.Any:
            continue
        try:
            adapter = TypeAdapter(hint)
        except Exception:  # a type pydantic cannot check (a torch class ...)
            continue
        try:  # scalars strictly (no "0.5" -> 0.5, no true -> 1), containers leniently (YAML lists for tuples)
            adapter.validate_python(value, strict=isinstance(value, (str, bool, int, float)))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join([prefix, key] + [str(p) for p in err["loc"]])
            raise ConfigError(f"{where}: {err['msg'][0].lower()}{err['msg'][1:]} (got {value!r})") from None


def method_params(cfg: RunConfig):
    """``method.*`` parsed by the chosen method's own Config."""
    try:
        return METHODS.get(cfg.method.name).Config.model_validate(cfg.method.params())
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix="method")) from None


# ---- building ------------------------------------------------------------------------------------------------


def load_data(data: DataConfig) -> DataSplits:
    """The dataset, checked (:func:`kbricks.data.validate.validate_splits`) before anything is built on it."""
    kwargs = dict(data.kwargs)
    if data.root is not None:
        kwargs["root"] = data.root
    try:
        splits = DATASETS.create(data.name, **kwargs)
    except (TypeError, ValueError) as exc:  # a loader choking on its arguments or its files: one line, not a traceback
        raise DataError(f"dataset {data.name!r} could not be loaded (data.kwargs {dict(data.kwargs)}): {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
    if not isinstance(splits, DataSplits):
        raise DataError(f"dataset {data.name!r} returned {type(splits).__name__}, not DataSplits(train, test)")
    validate_splits(relabel_splits(splits) if data.relabel else splits)
    if data.train_subset is not None:
        splits.train = splits.train.subset(torch.arange(min(data.train_subset, len(splits.train))))
    return splits


def build_transform(data: DataConfig, train: ArrayDataset) -> BatchAugment:
    mean = std = None
    if data.augment.normalize:
        mean, std = channel_stats(train.x)
    return BatchAugment(data.augment.crop_padding, data.augment.hflip, mean, std, train.input_shape)


def build_experiment(cfg: RunConfig, device: Optional[torch.device] = None) -> Experiment:
    device = device or pick_device(cfg.train.device)
    seed_everything(cfg.seed)  # model initialisation is a function of the seed only
    data = load_data(cfg.data)
    scenario = None
    if cfg.data.scenario is not None:
        scenario = build_scenario(cfg.data.scenario.name, data, **cfg.data.scenario.kwargs())
        train, tasks = scenario[0].train, []  # every task is normalised with the first task's statistics
    else:
        train, tasks = data.train, build_tasks(cfg.data.tasks, data.train)
    transform = build_transform(cfg.data, train)
    ctx = MethodContext(cfg, train, tasks, device, transform, scenario)
    try:
        method = METHODS.get(cfg.method.name)(method_params(cfg), ctx).to(device)
    except KbricksError:
        raise  # already one line naming the setting
    except Exception as exc:
        raise constructor_error(exc, cfg) from exc
    return Experiment(cfg, data, tasks, method, transform, device, scenario)


def constructor_error(exc: Exception, cfg: RunConfig) -> ConfigError:
    """One line for an error raised while the method was built: the model's constructor (a ``model.kwargs`` value
    it cannot use) when the error passed through ``create_model``, else the method's own constructor."""
    import traceback

    from ..models import create_model

    what = f"{type(exc).__name__}: {first_line(exc)}"
    if any(frame.f_code is create_model.__code__ for frame, _ in traceback.walk_tb(exc.__traceback__)):
        return ConfigError(f"could not build model {cfg.model.name!r} (model.kwargs {dict(cfg.model.kwargs)}) for method "
                           f"{cfg.method.name!r}: {what}")
    cls = METHODS.get(cfg.method.name)
    return ConfigError(f"method {cfg.method.name!r} ({cls.__module__}.{cls.__qualname__}) failed in its constructor: {what}")

"""Calling the factory of a user's network: import paths, classes and functions handed to the API, and the timm /
torchvision zoos (``timm:<name>``, ``torchvision:<name>``), sized to the data.

A factory gets the data's shape arguments its signature names (``num_classes``, ``in_channels``, ``image_size``,
``input_shape``). One whose signature is only ``**kwargs`` (a torchvision constructor, ``functools.partial(
timm.create_model, name)``) also gets ``num_classes`` (timm: ``in_chans`` when the data do not have 3 channels,
and ``img_size``; torchvision: ``image_size``); an argument the factory turns out not to take is dropped again.
Nothing is downloaded: zoo factories are called with ``pretrained=False`` / ``weights=None``, and a request for
pretrained weights is refused.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Dict, Optional, Set, Tuple

from torch import nn

from ..errors import ConfigError
from ..registry import importable_working_directory
from ._files import exception_line
from .spec import ZOO_PATH


def import_object(path: str, where: str) -> Any:
    """``package.module:attr.sub`` -> the object (the working directory is searched, like ``--import``)."""
    module_name, _, attr = path.partition(":")
    importable_working_directory()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def accepted_args(factory: Callable[..., Any]) -> Tuple[Set[str], bool, Set[str]]:
    """(accepted keyword names, accepts **kwargs, names without a default)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return set(), True, set()
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {n for n in names if params[n].default is inspect.Parameter.empty}
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values()), required


def factory_name(factory: Any) -> str:
    if isinstance(factory, functools.partial):
        shown = ", ".join([repr(a) for a in factory.args] + [f"{k}={v!r}" for k, v in factory.keywords.items()])
        return f"{factory_name(factory.func)}({shown})"
    return getattr(factory, "__qualname__", None) or getattr(factory, "__name__", None) or type(factory).__name__


def check_factory_kwargs(factory: Callable[..., Any], kwargs: Dict[str, Any], where: str) -> None:
    """Unknown keyword arguments of a factory that does not take ``**kwargs``: one line listing the accepted ones."""
    names, var_kw, _ = accepted_args(factory)
    unknown = sorted(set(kwargs) - names)
    if unknown and not var_kw:
        raise ConfigError(f"{where}: {factory_name(factory)} got unknown argument(s) {unknown}; accepted: {sorted(names)}")


def _zoo_of(factory: Any) -> Optional[str]:
    """``timm`` or ``torchvision`` when the factory comes from one of them."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    module = getattr(func, "__module__", "") or ""
    top = module.split(".", 1)[0]
    return top if top in ("timm", "torchvision") else None


def refuse_pretrained(factory: Any, kwargs: Dict[str, Any], where: str) -> None:
    """kbricks never downloads weights: a zoo factory asked for pretrained ones is refused in one line."""
    if _zoo_of(factory) is None:
        return
    given = {**(factory.keywords if isinstance(factory, functools.partial) else {}), **kwargs}
    asked = [k for k in ("pretrained", "weights", "checkpoint_path", "pretrained_cfg") if given.get(k) not in (None, False)]
    if asked:
        raise ConfigError(f"{where}: {asked[0]}={given[asked[0]]!r} asks for downloaded weights; kbricks never downloads: "
                          "remove it and give a local weights file instead ({path: timm:<name>, weights: file.safetensors})")


def _shape_extras(factory: Any, shape: Dict[str, Any]) -> Dict[str, Any]:
    """Shape arguments for a factory that takes only ``**kwargs`` (each dropped again if the factory refuses it)."""
    extras: Dict[str, Any] = {}
    if shape.get("num_classes") is not None:
        extras["num_classes"] = shape["num_classes"]
    size, channels = shape.get("image_size"), shape.get("in_channels")
    zoo = _zoo_of(factory)
    if zoo == "timm" and size is not None:
        if channels is not None and channels != 3:
            extras["in_chans"] = channels
        extras["img_size"] = size if isinstance(size, int) else tuple(size)
    elif zoo == "torchvision" and size is not None and (isinstance(size, int) or size[0] == size[1]):
        extras["image_size"] = size if isinstance(size, int) else int(size[0])
    return extras


def call_factory(factory: Callable[..., Any], kwargs: Dict[str, Any], where: str, shape: Optional[Dict[str, Any]] = None) -> Any:
    """Call a user factory with ``kwargs`` plus the data's shape arguments it takes (module docstring)."""
    check_factory_kwargs(factory, kwargs, where)
    refuse_pretrained(factory, kwargs, where)
    names, var_kw, required = accepted_args(factory)
    args = dict(kwargs)
    for k, v in (shape or {}).items():
        if k in names and k not in args:
            args[k] = v
    optional: Dict[str, Any] = {}
    if var_kw and shape:
        optional = {k: v for k, v in _shape_extras(factory, shape).items() if k not in args and k not in names}
    missing = sorted(required - set(args))
    if missing:
        raise ConfigError(f"{where}: {factory_name(factory)} needs argument(s) {missing}; give them in kwargs")
    while True:
        try:
            return factory(**args, **optional)
        except ConfigError:
            raise
        except TypeError as exc:  # an optional shape argument the factory does not take: drop it and call again
            refused = [k for k in optional if f"'{k}'" in str(exc)]
            if not refused:
                raise _failed(factory, {**args, **optional}, where, exc) from None
            optional = {k: v for k, v in optional.items() if k not in refused}
        except Exception as exc:
            raise _failed(factory, {**args, **optional}, where, exc) from None


def _failed(factory: Any, args: Dict[str, Any], where: str, exc: BaseException) -> ConfigError:
    func, positional = factory, []
    if isinstance(factory, functools.partial):  # shown as one call: create_model('resnet18', pretrained=False, num_classes=10)
        func, positional, args = factory.func, list(factory.args), {**factory.keywords, **args}
    shown = ", ".join([repr(a) for a in positional] + [f"{k}={v!r}" for k, v in args.items()])
    return ConfigError(f"{where}: {factory_name(func)}({shown}) failed: {exception_line(exc)}")


def class_count_hint(factory: Any) -> str:
    """The end of a 'outputs K classes but the data have N' error for a factory that did not take num_classes."""
    names, var_kw, _ = accepted_args(factory)
    if "num_classes" in names:
        return ""
    return (f": {factory_name(factory)} does not size its output from num_classes; give a factory that does, e.g. "
            f"lambda num_classes: {factory_name(factory)}(<its class-count argument>=num_classes)")


# ---- the zoos ------------------------------------------------------------------------------------------------


def zoo_factory(path: str, where: str) -> Callable[..., nn.Module]:
    """``timm:<name>`` / ``torchvision:<name>`` -> a factory taking keyword arguments (optional imports)."""
    match = ZOO_PATH.fullmatch(path)
    if match is None:
        raise ConfigError(f"{where}: {path!r} is not a zoo name (timm:<model> or torchvision:<model>)")
    zoo, name = match.groups()
    try:
        lib = importlib.import_module(zoo)
    except ImportError:
        raise ConfigError(f"{where}: {path} needs the {zoo} package: pip install {zoo} (or pip install kbricks[zoo])") from None
    if zoo == "timm":
        if not lib.is_model(name):
            close = lib.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ConfigError(f"{where}: timm has no model {name!r}; similar: {close}")
        return functools.partial(lib.create_model, name, pretrained=False)
    import torchvision.models as tvm

    if name not in tvm.list_models():
        close = [n for n in tvm.list_models() if name.split("_")[0] in n][:8]
        raise ConfigError(f"{where}: torchvision has no model {name!r}; similar: {close}")
    return functools.partial(tvm.get_model_builder(name), weights=None)


class ZooFactory:
    """A timm / torchvision model by name, built with random weights and sized to the data where it is used:
    ``kbricks.zoo("timm:resnet18", drop_rate=0.1)`` goes wherever a model class or factory goes (a student, a CKN, a
    backbone); ``zoo(...)(num_classes=10)`` builds one directly."""

    def __init__(self, spec: str, **kwargs: Any):
        where = f"zoo({spec!r})"
        self.spec, self.kwargs = spec, dict(kwargs)
        self.factory = zoo_factory(spec, where)
        refuse_pretrained(self.factory, self.kwargs, where)

    def __call__(self, num_classes: Optional[int] = None, in_channels: Optional[int] = None, image_size: Any = None) -> nn.Module:
        shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
        return call_factory(self.factory, self.kwargs, f"zoo({self.spec!r})", {k: v for k, v in shape.items() if v is not None})

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"zoo({self.spec!r}{extra})"


def zoo(spec: str, **kwargs: Any) -> ZooFactory:
    """A timm / torchvision model as a factory kbricks sizes to the data (see :class:`ZooFactory`)."""
    return ZooFactory(spec, **kwargs)

"""Opening a network spec: the one dispatch on what a path names (:func:`open_spec`), for frozen networks (a
teacher, a source) and trainable ones (a student, a CKN / TSN, a backbone), and :func:`create_model`, the entry
that builds any model by name, registered or not.

``create_model`` and the kbricks run format are one module because they recurse: a run records its model by name,
and a model name may be another kbricks run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..core.checkpoint import fingerprint, load_safetensors, load_state_into
from ..data.base import input_shape_of
from ..errors import CheckpointError, ConfigError
from ..registry import OBJECTS
from ._factory import ZooFactory, call_factory, check_factory_kwargs, class_count_hint, import_object, zoo_factory
from ._files import check_weight_dtypes, load_exported, load_torchscript, load_weights
from ._probe import check_built
from .base import MODELS, Classifier
from .card import read_model_card
from .heads import MultiHeadClassifier
from .spec import NetworkSpec, looks_like_network, path_kind
from .wrappers import CallableNetwork, ForeignClassifier


@dataclass
class Opened:
    module: nn.Module
    kind: str
    normalize: Optional[Dict[str, Any]]  # None: the data as loaded
    card: Dict[str, Any] = field(default_factory=dict)
    input_shape: Optional[Tuple[int, ...]] = None  # known for kbricks runs
    task_names: List[str] = field(default_factory=list)
    factory: Any = None  # what built a trainable network (for error hints)


def _norm_of(spec: NetworkSpec) -> Optional[Dict[str, Any]]:
    n = spec.normalize
    return None if n is None or n == "none" else {"mean": list(n.mean), "std": list(n.std)}


def _copy(module: Any) -> Any:
    """Frozen networks switch to eval mode and stop gradients, trained ones change: work on a copy, not on the
    user's object (an object that cannot be copied is used as it is)."""
    try:
        return copy.deepcopy(module)
    except Exception:
        return module


MISSING = "a kbricks run directory or model.json, a TorchScript file, an import path package.module:factory or timm:/torchvision:<model>"


def open_spec(spec: NetworkSpec, trainable: bool, where: str, shape: Optional[Dict[str, Any]] = None) -> Opened:
    """The network ``spec`` names. ``trainable=False``: a trained network to freeze (its spec must state its input
    convention; a class or factory is refused). ``trainable=True``: a network to train, built fresh from a factory
    sized by ``shape`` (num_classes, in_channels, image_size, input_shape) or copied / initialised from a file."""
    kind = spec.kind
    if not trainable:
        problem = spec.problem()
        if problem:
            raise ConfigError(f"{where}: {problem}")
    if kind == "missing":
        raise ConfigError(f"{where}: {spec.path!r} does not exist (expected {MISSING})")
    if kind == "weights":
        raise ConfigError(f"{where}: {spec.problem()}")
    if kind in ("kbricks", "torchscript", "exported") and spec.kwargs:
        what = {"kbricks": "a kbricks run", "torchscript": "a TorchScript file", "exported": "a torch.export file"}[kind]
        why = " (its architecture is in its model.json)" if kind == "kbricks" else ""
        raise ConfigError(f"{where}: {what} takes no {'model.kwargs' if trainable else 'kwargs'}{why}")
    factory = None
    if kind == "kbricks":
        net, card = load_trained_model(spec.path, verify=True)
        latent = [t["name"] for t in card.get("tasks", []) if t.get("latent") is not None]
        norm = card.get("normalize") if card.get("normalize", {}).get("mean") is not None else None
        return Opened(net, kind, norm, card, tuple(input_shape_of(card["in_channels"], card["image_size"])), latent)
    if kind == "torchscript":
        module: Any = load_torchscript(spec.path, where)
    elif kind == "exported":
        module = load_exported(spec.path, where)
    elif kind in ("import", "zoo"):
        obj = import_object(spec.path, where) if kind == "import" else zoo_factory(spec.path, where)
        if callable(obj) and not isinstance(obj, nn.Module):
            factory = obj
            module = call_factory(obj, spec.kwargs, where, shape if trainable else None)
        else:
            module = _copy(obj)
    else:
        obj = OBJECTS.get(spec.path, where)
        if isinstance(obj, nn.Module):
            if trainable and spec.kwargs:
                raise ConfigError(f"{where}: an nn.Module object takes no model.kwargs (pass its class or a factory to configure it)")
            module = _copy(obj)
        elif not trainable and isinstance(obj, (type, ZooFactory)):
            what = f"the class {obj.__name__}" if isinstance(obj, type) else f"{obj!r}, a factory"
            raise ConfigError(f"{where}: got {what}; a teacher or source must be a trained network object")
        elif callable(obj):
            if trainable:
                factory = obj
                module = call_factory(obj, spec.kwargs, where, shape)
            else:
                module = CallableNetwork(obj)
        else:
            what = "an nn.Module, a class or a factory" if trainable else "an nn.Module nor a callable returning logits"
            raise ConfigError(f"{where}: a {type(obj).__name__} is not {what}")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}: {spec.path} gave a {type(module).__name__}, not an nn.Module")
    if spec.weights:
        state = load_weights(spec.weights, spec.weights_key, where)
        check_weight_dtypes(module, state, f"{where}: {spec.weights}")
        load_state_into(module, state, f"network {spec.path} ({where})")
    if not trainable:
        module.eval()  # a trained network is handed on in eval mode (its running statistics are not updated by use)
    card = {"source": spec.to_json(), "kind": kind, "fingerprint": fingerprint(module.state_dict()) if len(module.state_dict()) else None}
    return Opened(module, kind, _norm_of(spec), card, factory=factory)


# ---- trainable networks by name --------------------------------------------------------------------------------


def create_model(name: str, head: Optional[str] = None, features: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """A registered model, or a user network named by a spec string (a kbricks run, a TorchScript file, an import
    path ``package.module:factory``, ``timm:<name>`` / ``torchvision:<name>``, an API object): see
    :func:`build_backbone`. With the data's shape arguments, one zero batch checks that the model takes that shape
    and predicts ``num_classes`` outputs. ``head`` / ``features`` name layers of a user network (default: found by
    running it)."""
    if name not in MODELS and looks_like_network(name):
        return build_backbone(name, head=head, features=features, **kwargs)
    if head is not None or features is not None:
        raise ConfigError(f"model {name!r} is a kbricks model with its own head and features; head / features name layers of a user network")
    net = MODELS.create(name, **kwargs)
    if all(k in kwargs for k in ("num_classes", "in_channels", "image_size")):
        check_built(net, name, kwargs["num_classes"], input_shape_of(kwargs["in_channels"], kwargs["image_size"]))
    return net


def build_backbone(name: str, num_classes: int, in_channels: int, image_size, head: Optional[str] = None,
                   features: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """A trainable network from a spec string used as ``model.name`` (or a TSN's name): fresh from an import-path,
    zoo or API factory (called with ``kwargs`` and the data's shape arguments), a copy of an API module, or initialised
    from a TorchScript file / kbricks run. ``num_classes=0`` asks for features only."""
    where = f"model {name!r}"
    input_shape = input_shape_of(in_channels, image_size)
    shape = {"num_classes": num_classes or 1, "in_channels": in_channels, "image_size": image_size, "input_shape": input_shape}
    if path_kind(name) == "missing":
        raise ConfigError(f"{where}: no such registered model, file or directory (a model is a registered name, a kbricks run, "
                          "a TorchScript file, an import path package.module:factory or timm:/torchvision:<model>)")
    opened = open_spec(NetworkSpec.model_construct(path=name, kwargs=kwargs), True, where, shape)
    if opened.kind == "kbricks" and tuple(opened.input_shape) != tuple(input_shape):
        raise ConfigError(f"{where} was trained on inputs {list(opened.input_shape)} but the data give {list(input_shape)}")
    module = opened.module
    if isinstance(module, Classifier) and head is None and features is None:
        net: nn.Module = module
    else:
        net = ForeignClassifier(module, input_shape, num_classes, where, head, features)
    check_built(net, name, num_classes, input_shape, class_count_hint(opened.factory) if opened.factory is not None else "")
    return net


def check_network_name(name: str, kwargs: Dict[str, Any], where: str) -> None:
    """Config-time check of a model name that is not registered: it must name a user network, and an import path's
    or zoo factory must exist and accept ``kwargs``. Files are read when the model is built."""
    if not looks_like_network(name):
        MODELS.get(name)  # the registry's one-line error, listing the registered names
    kind = path_kind(name)
    if kind in ("import", "zoo"):
        factory = import_object(name, where) if kind == "import" else zoo_factory(name, where)
        if callable(factory) and not isinstance(factory, nn.Module):
            check_factory_kwargs(factory, kwargs, where)
    elif kind == "memory":
        OBJECTS.get(name, where)


# ---- the kbricks run format -------------------------------------------------------------------------------------


def build_from_card(card: Dict[str, Any]) -> nn.Module:
    latent = [t for t in card.get("tasks", []) if t.get("latent") is not None]
    n_out = 0 if latent else card["num_classes"]
    model = card["model"]
    image_size = card["image_size"]
    layers = {k: model[k] for k in ("head", "features") if model.get(k) is not None}
    net = create_model(model["name"], num_classes=n_out, in_channels=card["in_channels"],
                       image_size=tuple(image_size) if isinstance(image_size, list) else image_size, **layers, **model.get("kwargs", {}))
    return MultiHeadClassifier(net, [t["num_classes"] for t in latent]) if latent else net


def load_trained_model(path, verify: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """The classifier of a kbricks run, in eval mode; with ``verify`` its weights must hash to the card's fingerprint."""
    card, folder = read_model_card(path)
    net, tensors = build_from_card(card), load_safetensors(folder / "model.safetensors")
    if verify and card.get("fingerprint") is not None and fingerprint(tensors) != card["fingerprint"]:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match the fingerprint in {folder / 'model.json'} "
                              "(modified or corrupt): refusing it")
    load_state_into(net, tensors, f"model described by {folder / 'model.json'}")
    return net.eval(), card


__all__: Sequence[str] = ["Opened", "open_spec", "create_model", "build_backbone", "check_network_name", "build_from_card",
                          "load_trained_model"]

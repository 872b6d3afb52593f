"""Networks a user brings, wherever kbricks names a network (a teacher, an SSKT source, a CKN / TSN / backbone).

A *network spec* names one of:

* a kbricks run directory or its ``model.json`` (architecture, weights, input normalisation and fingerprint);
* a TorchScript file saved with ``torch.jit.save``;
* an import path ``package.module:factory`` called with ``kwargs``, plus an optional ``weights`` file
  (``.safetensors``, or a ``torch.save`` state_dict read with ``weights_only=True``);
* an object handed to the Python API (``memory:<kind>-<n>``): an ``nn.Module``, a class / factory, or any callable
  returning logits.

The input convention of a network that is not a kbricks run is part of its spec, never guessed: ``normalize`` is
``none`` (it takes the data as kbricks loads it, images in [0, 1]) or ``{mean, std}`` (it takes
``(x - mean) / std`` of that); ``input`` optionally maps channels, resizes and reshapes the data first (a source
trained on other images). Features are read from a named layer with a forward hook, by default the input of the
last ``nn.Linear``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from ..core.checkpoint import fingerprint, load_safetensors, load_state_into
from ..data.augment import channel_view
from ..data.base import input_shape_of
from ..errors import CheckpointError, ConfigError
from ..registry import OBJECTS, ObjectStore

# ---- the spec ----------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NormalizeSpec(_Strict):
    """The network takes ``(x - mean) / std`` of the data as kbricks loads it (one value per channel or feature, or
    one value for all)."""

    mean: List[float] = Field(..., min_length=1)
    std: List[float] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _positive(self) -> "NormalizeSpec":
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        return self


class InputSpec(_Strict):
    """How the data are turned into the network's input, in this order: ``channels`` (a list of input channel ids,
    one per network channel, e.g. [0, 0, 0] for grey -> RGB, or ``mean`` for RGB -> grey), ``size`` (bilinear resize
    to S or [H, W]), ``shape`` (reshape each sample, e.g. [64] for an MLP trained on flattened 8x8 images)."""

    channels: Optional[Union[List[int], Literal["mean"]]] = None
    size: Optional[Union[int, Tuple[int, int]]] = None
    shape: Optional[List[int]] = None


KINDS = ("kbricks", "torchscript", "import", "memory")
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def network_kind(path: str) -> str:
    """Which kind of network a spec's ``path`` names: kbricks, torchscript, import, memory, ``weights`` (a file that
    holds no network: a state_dict or a pickle) or missing (nothing there yet: an error when it is loaded)."""
    if ObjectStore.is_key(path):
        return "memory"
    p = Path(path)
    if p.is_dir() or path.endswith(".json"):
        return "kbricks"
    if p.is_file():
        return "torchscript" if is_torchscript_archive(p) else "weights"
    if IMPORT_PATH.fullmatch(path):
        return "import"
    return "missing"


class NetworkSpec(_Strict):
    """A network named in a config: a plain string is ``{path: <string>}``."""

    path: str = Field(..., min_length=1, description="run dir / model.json, TorchScript file, package.module:factory, or memory:...")
    kwargs: Dict[str, Any] = Field(default_factory=dict, description="keyword arguments of an import-path factory")
    weights: Optional[str] = Field(None, description="weights of an import-path network: .safetensors or a .pt state_dict")
    weights_key: Optional[str] = Field(None, description="the entry of a .pt file that holds the state_dict (e.g. state_dict)")
    normalize: Optional[Union[Literal["none"], NormalizeSpec]] = Field(
        None, description="input convention of a network that is not a kbricks run: none, or {mean, std}")
    input: Optional[InputSpec] = Field(None, description="channel map / resize / reshape from the data to the network's input")
    features: Optional[str] = Field(None, description="layer whose output gives features ('<layer>:input' for its input); "
                                                      "default: the input of the last nn.Linear")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        import os

        return {"path": os.fspath(value)} if isinstance(value, (str, os.PathLike)) else value

    @model_validator(mode="after")
    def _convention_stated(self) -> "NetworkSpec":
        problem = self.problem()
        if problem:
            raise PydanticCustomError("network_spec", problem)
        return self

    def problem(self) -> Optional[str]:
        """What is wrong with this spec for the network now at its path (checked again when it is loaded)."""
        kind = self.kind
        if kind == "weights":
            return (f"{self.path} is not a TorchScript file (a torch.save state_dict or pickled model is not a network on its "
                    "own): save the network with torch.jit.save(torch.jit.script(net)), or give its architecture as an import "
                    f"path with these weights: {{path: package.module:Factory, weights: {self.path}, normalize: ...}}")
        if kind == "kbricks" and self.normalize is not None:
            return f"{self.path} is a kbricks run: it records its own input normalisation; remove normalize"
        if kind in ("torchscript", "import") and self.normalize is None:
            what = "a TorchScript file" if kind == "torchscript" else "a Python import path"
            return (f"{self.path} is {what}: state its input convention with normalize: none (it takes the data as loaded, "
                    "images in [0, 1]) or normalize: {mean: [...], std: [...]}, e.g. {path: " + self.path + ", normalize: none}")
        if kind not in ("import", "missing") and (self.kwargs or self.weights):
            return f"kwargs and weights go with an import path package.module:factory, not with {self.path}"
        if self.weights_key and not self.weights:
            return "weights_key needs weights"
        return None

    @property
    def kind(self) -> str:
        return network_kind(self.path)

    def describe(self) -> str:
        return self.path

    def to_json(self) -> Union[str, Dict[str, Any]]:
        """The spec as it would be written in a config (a bare path when nothing else is set)."""
        d = self.model_dump(mode="json", exclude_defaults=True)
        return d["path"] if list(d) == ["path"] else d


NetworkRef = Union[str, Dict[str, Any], NetworkSpec]


def as_spec(ref: NetworkRef, where: str = "network") -> NetworkSpec:
    if isinstance(ref, NetworkSpec):
        return ref
    from pydantic import ValidationError

    try:
        return NetworkSpec.model_validate(ref)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


# ---- opening the file / object -----------------------------------------------------------------------------------


def import_object(path: str, where: str) -> Any:
    """``package.module:attr.sub`` -> the object (the working directory is searched, like ``--import``)."""
    import os
    import sys

    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: str, where: str) -> nn.Module:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{where}: {path!r} does not exist (expected a kbricks run directory, model.json, a TorchScript file "
                          "or an import path package.module:factory)")
    if not is_torchscript_archive(p):
        raise ConfigError(
            f"{where}: {path} is not a TorchScript file; a torch.save state_dict or pickled model is not a network on its own: "
            "save it with torch.jit.save(torch.jit.script(net)), or give its architecture as an import path "
            f"{{path: package.module:Factory, weights: {path}}}")
    try:
        return torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: TorchScript file {path} is corrupt or unreadable ({first})") from None


def load_weights(path: str, key: Optional[str], where: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from a ``torch.save`` file read with ``weights_only=True`` (no pickle)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{where}: weights file {path!r} does not exist")
    if p.suffix == ".safetensors":
        return load_safetensors(p)
    if is_torchscript_archive(p):
        raise ConfigError(f"{where}: weights file {path} is a TorchScript network; give it as the path itself, without an import path")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: {path} cannot be read with weights_only=True (a state_dict of tensors is expected; "
                              f"pickled models are refused): {first[:200]}") from None
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{where}: {path} has no entry {key!r} (found {found})")
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{where}: {path} is not a state_dict of tensors (non-tensor entries: {found}); "
                              "set weights_key to the entry that holds it")
    return state


SHAPE_ARGS = ("num_classes", "in_channels", "image_size")


def accepted_args(factory: Callable[..., Any]) -> Tuple[set, bool, set]:
    """(accepted keyword names, accepts **kwargs, names without a default)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return set(), True, set()
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {n for n in names if params[n].default is inspect.Parameter.empty}
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values()), required


def call_factory(factory: Callable[..., Any], kwargs: Dict[str, Any], where: str, shape: Optional[Dict[str, Any]] = None) -> Any:
    """Call a user factory with ``kwargs`` plus those of the data's shape arguments its signature names."""
    names, var_kw, required = accepted_args(factory)
    if not var_kw:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"{where}: {getattr(factory, '__name__', factory)} got unknown argument(s) {unknown}; accepted: {sorted(names)}")
    args = dict(kwargs)
    for k, v in (shape or {}).items():
        if k in names and k not in args:
            args[k] = v
    missing = sorted(required - set(args))
    if missing:
        raise ConfigError(f"{where}: {getattr(factory, '__name__', factory)} needs argument(s) {missing}; give them in kwargs")
    try:
        return factory(**args)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{where}: {getattr(factory, '__name__', factory)}({', '.join(f'{k}={v!r}' for k, v in args.items())}) "
                          f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


class CallableNetwork(nn.Module):
    """Any callable returning logits (a function, a bound ``predict``), as a module without parameters."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@dataclass
class Opened:
    """A network read from its spec, before wrapping."""

    module: nn.Module
    kind: str
    normalize: Optional[Dict[str, Any]]  # {mean, std} the network expects, or None (the data as loaded)
    card: Dict[str, Any] = field(default_factory=dict)
    input_shape: Optional[Tuple[int, ...]] = None  # known for kbricks runs
    task_names: List[str] = field(default_factory=list)


def _norm_of(spec: NetworkSpec) -> Optional[Dict[str, Any]]:
    if spec.normalize is None or spec.normalize == "none":
        return None
    return {"mean": list(spec.normalize.mean), "std": list(spec.normalize.std)}


def open_network(spec: NetworkSpec, where: str) -> Opened:
    """The trained network a spec names, with what is known of its input convention (a frozen teacher or source)."""
    from .frozen import load_trained_model  # the kbricks run format

    kind = spec.kind
    problem = spec.problem()
    if problem:
        raise ConfigError(f"{where}: {problem}")
    if kind == "missing":
        raise ConfigError(f"{where}: {spec.path!r} does not exist (expected a kbricks run directory or model.json, a TorchScript "
                          "file, or an import path package.module:factory)")
    if kind == "kbricks":
        net, card = load_trained_model(spec.path, verify=True)
        latent = [t["name"] for t in card.get("tasks", []) if t.get("latent") is not None]
        norm = card.get("normalize") if card.get("normalize", {}).get("mean") is not None else None
        return Opened(net, kind, norm, card, input_shape_of(card["in_channels"], card["image_size"]), latent)
    if kind == "torchscript":
        module = load_torchscript(spec.path, where)
    elif kind == "import":
        obj = import_object(spec.path, where)
        module = call_factory(obj, spec.kwargs, where) if callable(obj) and not isinstance(obj, nn.Module) else _copy(obj)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{where}: {spec.path} gave a {type(module).__name__}, not an nn.Module")
        if spec.weights:
            load_state_into(module, load_weights(spec.weights, spec.weights_key, where), f"network {spec.path} ({where})")
    else:
        obj = OBJECTS.get(spec.path, where)
        if isinstance(obj, type):
            raise ConfigError(f"{where}: got the class {obj.__name__}; a teacher or source must be a trained network object")
        if isinstance(obj, nn.Module):
            module = _copy(obj)
        elif callable(obj):
            module = CallableNetwork(obj)
        else:
            raise ConfigError(f"{where}: a {type(obj).__name__} is neither an nn.Module nor a callable returning logits")
    card = {"source": spec.to_json(), "kind": kind, "fingerprint": fingerprint(module.state_dict()) if len(module.state_dict()) else None}
    return Opened(module, kind, _norm_of(spec), card)


def _copy(module: Any) -> Any:
    """Frozen networks switch to eval mode and stop gradients, trained ones change: work on a copy, not on the
    user's object (an object that cannot be copied is used as it is)."""
    try:
        return copy.deepcopy(module)
    except Exception:
        return module


# ---- input conversion ------------------------------------------------------------------------------------------


class InputAdapter(nn.Module):
    """From the method's inputs to the network's: undo the run's normalisation, map channels / resize / reshape as
    the spec says, apply the network's normalisation. Identity steps cost nothing."""

    def __init__(self, data_norm: Optional[Dict[str, Any]], net_norm: Optional[Dict[str, Any]], spec: Optional[InputSpec] = None):
        super().__init__()

        def stats(norm):
            if not norm or norm.get("mean") is None:
                return torch.zeros(1), torch.ones(1)
            return torch.tensor(norm["mean"], dtype=torch.float32), torch.tensor(norm["std"], dtype=torch.float32)

        for prefix, norm in (("data", data_norm), ("net", net_norm)):
            m, s = stats(norm)
            self.register_buffer(f"{prefix}_mean", m)
            self.register_buffer(f"{prefix}_std", s)
        self.spec = spec or InputSpec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * channel_view(self.data_std, x) + channel_view(self.data_mean, x)
        spec = self.spec
        if spec.channels is not None:
            if x.dim() != 4:
                raise ConfigError(f"input.channels needs images [N, C, H, W], got {list(x.shape)}")
            x = x.mean(1, keepdim=True) if spec.channels == "mean" else x[:, list(spec.channels)]
        if spec.size is not None:
            if x.dim() != 4:
                raise ConfigError(f"input.size needs images [N, C, H, W], got {list(x.shape)}")
            size = (spec.size, spec.size) if isinstance(spec.size, int) else tuple(spec.size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if spec.shape is not None:
            x = x.reshape(x.shape[0], *spec.shape)
        return (x - channel_view(self.net_mean, x)) / channel_view(self.net_std, x)


# ---- features from a named layer -----------------------------------------------------------------------------


def last_linear(module: nn.Module) -> Optional[str]:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


class FeatureTap:
    """Features of any ``nn.Module`` from one forward pass: the output of a named layer (``layer``) or its input
    (``layer:input``); by default the input of the last ``nn.Linear``. Read with a forward hook, flattened to [B, D].
    Not a module (holds no state of its own)."""

    def __init__(self, module: nn.Module, layer: Optional[str] = None, where: str = "features"):
        self.module = module
        if isinstance(module, torch.jit.ScriptModule):
            self.name, self.use_input = None, False  # hooks do not run on TorchScript: see __call__
            return
        if layer is None:
            name = last_linear(module)
            if name is None:
                raise ConfigError(f"{where}: the network has no nn.Linear layer; name the layer that gives its features")
            layer = f"{name}:input"
        name, _, part = layer.partition(":")
        if part not in ("", "input", "output"):
            raise ConfigError(f"{where}: {layer!r}: write '<layer>' (its output) or '<layer>:input'")
        modules = dict(module.named_modules())
        if name not in modules:
            listed = [n for n in modules if n][:12]
            raise ConfigError(f"{where}: the network has no layer {name!r}; its layers include {listed}")
        self.name, self.use_input = name, part == "input"
        self.layer = modules[name]

    def __call__(self, x: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """(the network's output, the features [B, D])."""
        if self.name is None:
            fn = getattr(self.module, "features", None)
            if fn is None or not callable(fn):
                raise ConfigError("features of a TorchScript network: export a method `features(x)` with @torch.jit.export, "
                                  "or give the network as an import path so a layer can be read")
            z = fn(x)
            return None, z.flatten(1)
        captured: List[torch.Tensor] = []

        def hook(mod, inputs, output):
            captured.append(inputs[0] if self.use_input else output)

        handle = self.layer.register_forward_hook(hook)
        try:
            out = self.module(x)
        finally:
            handle.remove()
        if not captured:
            raise ConfigError(f"features: layer {self.name!r} was not called by the network's forward")
        z = captured[-1]
        if not isinstance(z, torch.Tensor):
            raise ConfigError(f"features: layer {self.name!r} gives a {type(z).__name__}, not a tensor")
        return out, z.flatten(1)


# ---- one dummy batch -------------------------------------------------------------------------------------------


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


@torch.no_grad()
def probe(module: nn.Module, x: torch.Tensor, where: str, shown_shape: Union[str, Sequence[int]], fn: Optional[Callable] = None) -> Any:
    """One forward pass (``fn``, default the module) in eval mode, so running statistics stay untouched; a failure
    is one line naming the input shape."""
    was = module.training
    module.eval()
    try:
        return (fn or module)(x)
    except ConfigError:
        raise
    except Exception as exc:
        shown = shown_shape if isinstance(shown_shape, str) else str(list(shown_shape))
        raise ConfigError(f"{where} fails on one batch of the data (input shape {shown}): {first_line(exc)}") from None
    finally:
        module.train(was)


def output_classes(out: Any, where: str, batch: int) -> Union[int, List[int]]:
    """Number of outputs of logits [B, K] (or of each head of a multi-head network)."""
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return [output_classes(o, where, batch) for o in out]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{where} returns a {type(out).__name__}; it must return logits [batch, classes] (wrap it in a module "
                          "whose forward returns the logits tensor)")
    if out.dim() != 2 or out.shape[0] != batch:
        raise ConfigError(f"{where} returns a tensor of shape {list(out.shape)} for a batch of {batch}; logits [batch, classes] are expected")
    return int(out.shape[1])


# ---- a user module as a trainable backbone ---------------------------------------------------------------------


class ForeignClassifier(nn.Module):
    """A user's ``nn.Module`` used where kbricks needs a classifier (a student, a CKN or TSN backbone): its forward is
    the module's; ``features`` is the input of its last ``nn.Linear`` (``head``), read with a hook."""

    def __init__(self, module: nn.Module, input_shape: Sequence[int], num_classes: int, where: str):
        super().__init__()
        self.module = module
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.where = where
        self.tap = FeatureTap(module, None, where)
        self._feature_dim: Optional[int] = None

    @property
    def head(self) -> nn.Module:
        if self.tap.name is None:
            raise ConfigError(f"{self.where}: a TorchScript network has no addressable head")
        return self.tap.layer

    @property
    def feature_dim(self) -> int:
        if self._feature_dim is None:
            _, z = probe(self.module, torch.zeros(2, *self.input_shape), self.where, (2, *self.input_shape), self.tap)
            self._feature_dim = int(z.shape[1])
        return self._feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap(x)[1]

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)


def looks_like_network(name: str) -> bool:
    """A model name that is not a registry name: a path, an import path or an API object."""
    return ObjectStore.is_key(name) or bool(IMPORT_PATH.fullmatch(name)) or Path(name).exists() or "/" in name or name.endswith((".pt", ".pth", ".json"))


def build_backbone(name: str, num_classes: int, in_channels: int, image_size, **kwargs: Any) -> nn.Module:
    """A trainable network from a spec string used as ``model.name`` (or a TSN's name): fresh from an import-path
    factory or an API class / factory (called with ``kwargs`` and the data's shape arguments it names), a copy of an
    API module, or initialised from a TorchScript file / kbricks run. ``num_classes=0`` asks for features only."""
    from .base import Classifier
    from .frozen import load_trained_model

    where = f"model {name!r}"
    input_shape = input_shape_of(in_channels, image_size)
    shape = {"num_classes": num_classes or 1, "in_channels": in_channels, "image_size": image_size, "input_shape": input_shape}
    kind = network_kind(name)
    if kind == "missing":
        raise ConfigError(f"{where}: no such registered model, file or directory (a model is a registered name, a kbricks run, "
                          "a TorchScript file or an import path package.module:factory)")
    if kind == "kbricks":
        if kwargs:
            raise ConfigError(f"{where}: a kbricks run takes no model.kwargs (its architecture is in its model.json)")
        net, card = load_trained_model(name, verify=True)
        trained = input_shape_of(card["in_channels"], card["image_size"])
        if tuple(trained) != tuple(input_shape):
            raise ConfigError(f"{where} was trained on inputs {list(trained)} but the data give {list(input_shape)}")
        module: nn.Module = net
    elif kind == "torchscript":
        if kwargs:
            raise ConfigError(f"{where}: a TorchScript file takes no model.kwargs")
        module = load_torchscript(name, where)
    elif kind == "import":
        obj = import_object(name, where)
        module = call_factory(obj, kwargs, where, shape) if callable(obj) and not isinstance(obj, nn.Module) else _copy(obj)
    else:
        obj = OBJECTS.get(name, where)
        if isinstance(obj, nn.Module):
            if kwargs:
                raise ConfigError(f"{where}: an nn.Module object takes no model.kwargs (pass its class or a factory to configure it)")
            module = _copy(obj)
        elif callable(obj):
            module = call_factory(obj, kwargs, where, shape)
        else:
            raise ConfigError(f"{where}: a {type(obj).__name__} is not a network, a class or a factory")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where} gave a {type(module).__name__}, not an nn.Module")
    net = module if isinstance(module, Classifier) else ForeignClassifier(module, input_shape, num_classes, where)
    check_built(net, name, num_classes, input_shape)
    return net


def check_built(net: nn.Module, name: str, num_classes: int, input_shape: Sequence[int]) -> None:
    """One zero batch through a freshly built model: a model that cannot take the data's shape, or that predicts
    another number of classes than the data have, fails here in one line instead of at the first training step."""
    x = torch.zeros(2, *input_shape)
    out = probe(net, x, f"model {name!r}", x.shape)
    if num_classes > 0 and isinstance(out, torch.Tensor):
        k = output_classes(out, f"model {name!r}", 2)
        if k != num_classes:
            raise ConfigError(f"model {name!r} outputs {k} classes but the data have {num_classes}")


def check_network_name(name: str, kwargs: Dict[str, Any], where: str) -> None:
    """Config-time check of a model name that is not registered: it must name a user network, and an import path's
    factory must import and accept ``kwargs``. Files are read when the model is built."""
    from .base import MODELS

    if not looks_like_network(name):
        MODELS.get(name)  # the registry's one-line error, listing the registered names
    kind = network_kind(name)
    if kind == "import":
        factory = import_object(name, where)
        if callable(factory) and not isinstance(factory, nn.Module):
            names, var_kw, _ = accepted_args(factory)
            unknown = sorted(set(kwargs) - names)
            if unknown and not var_kw:
                raise ConfigError(f"{where}: {name} got unknown argument(s) {unknown}; accepted: {sorted(names)}")
    elif kind == "memory":
        OBJECTS.get(name, where)

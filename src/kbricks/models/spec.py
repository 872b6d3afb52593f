"""The network spec: how a config or the API names a network (a teacher, an SSKT source, a model, a backbone).

A spec's ``path`` names one of:

* a kbricks run directory or its ``model.json`` (architecture, weights, input normalisation and fingerprint);
* a TorchScript file saved with ``torch.jit.save``;
* a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``, checked for pickled parts first);
* an import path ``package.module:factory`` called with ``kwargs``, plus an optional ``weights`` file
  (``.safetensors``, or a ``torch.save`` state_dict read with ``weights_only=True``);
* a zoo model ``timm:<name>`` or ``torchvision:<name>`` (built with random weights, ``kwargs`` and an optional
  ``weights`` file: nothing is ever downloaded);
* an object handed to the Python API (``memory:<kind>-<n>``): an ``nn.Module``, a class / factory, or any callable
  returning logits.

The input convention of a network that is not a kbricks run is part of its spec, never guessed: ``normalize`` is
``none`` (it takes the data as kbricks loads it, images in [0, 1]) or ``{mean, std}``; ``input`` optionally maps
channels, resizes and reshapes the data first. ``head`` / ``features`` name layers when the classifier cannot be
found by running the network (:mod:`kbricks.models.taps`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..errors import ConfigError
from ..registry import ObjectStore
from ._files import is_broken_archive, is_torchscript_archive
from .exported import is_exported_archive


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NormalizeSpec(_Strict):
    """The network takes ``(x - mean) / std`` of the data as kbricks loads it (one value per channel or feature, or
    one value for all)."""

    mean: List[float] = Field(..., min_length=1)
    std: List[float] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _positive(self) -> "NormalizeSpec":
        if not all(math.isfinite(m) for m in self.mean):
            raise ValueError(f"mean must be finite numbers, got {self.mean}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):  # nan <= 0 is False: test what is allowed
            raise ValueError(f"std must be finite positive numbers (the inputs are divided by it), got {self.std}; give the statistics the network was trained with")
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


SOURCE_KINDS = ("kbricks", "torchscript", "exported", "import", "zoo", "memory")
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
ZOO_PATH = re.compile(r"(timm|torchvision):([A-Za-z_][\w.\-]*)")


def path_kind(path: str) -> str:
    """What a spec's ``path`` names: kbricks, torchscript, import, zoo, memory, ``weights`` (a file that holds no
    network: a state_dict or a pickle) or missing (nothing there yet: an error when it is opened)."""
    if ObjectStore.is_key(path):
        return "memory"
    if ZOO_PATH.fullmatch(path):
        return "zoo"
    p = Path(path)
    if p.is_dir() or path.endswith(".json"):
        return "kbricks"
    if p.is_file() and is_exported_archive(p):
        return "exported"
    if p.is_file():
        # a zip archive cut short can only be meant as a network here: opening it says it is truncated
        return "torchscript" if is_torchscript_archive(p) or is_broken_archive(p) else "weights"
    if IMPORT_PATH.fullmatch(path):
        return "import"
    return "missing"


def looks_like_network(name: str) -> bool:
    """A model name that is not a registry name: a path, an import path, a zoo name or an API object."""
    return (ObjectStore.is_key(name) or bool(IMPORT_PATH.fullmatch(name)) or bool(ZOO_PATH.fullmatch(name))
            or Path(name).exists() or "/" in name or name.endswith((".pt", ".pth", ".json")))


class NetworkSpec(_Strict):
    """A network named in a config: a plain string is ``{path: <string>}``."""

    path: str = Field(..., min_length=1, description="run dir / model.json, TorchScript file, package.module:factory, "
                                                     "timm:<name> / torchvision:<name>, or memory:...")
    kwargs: Dict[str, Any] = Field(default_factory=dict, description="keyword arguments of an import-path or zoo factory")
    weights: Optional[str] = Field(None, description="weights of an import-path or zoo network: .safetensors or a .pt state_dict")
    weights_key: Optional[str] = Field(None, description="the entry of a .pt file that holds the state_dict (e.g. state_dict)")
    normalize: Optional[Union[Literal["none"], NormalizeSpec]] = Field(
        None, description="input convention of a network that is not a kbricks run: none, or {mean, std}")
    input: Optional[InputSpec] = Field(None, description="channel map / resize / reshape from the data to the network's input")
    head: Optional[str] = Field(None, description="the classifier layer (a name from named_modules()); default: the nn.Linear "
                                                  "whose output is the network's output, found by running it once")
    features: Optional[str] = Field(None, description="layer whose output gives features ('<layer>:input' for its input); "
                                                      "default: the input of the head")
    check: bool = Field(True, description="a teacher sharing the data's labels: refuse it when another obvious input "
                                          "convention (standardised, 0..255, NHWC) scores far better on the training data")

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_problem(cls, value: Any) -> Any:
        """A bad {mean, std} gets its own one-line error (not the union's 'Input should be none')."""
        if isinstance(value, dict):
            try:
                return NormalizeSpec.model_validate(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{field + ': ' if field else ''}{first['msg'].removeprefix('Value error, ')}") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": os.fspath(value)} if isinstance(value, (str, os.PathLike)) else value

    @model_validator(mode="after")
    def _convention_stated(self) -> "NetworkSpec":
        problem = self.problem()
        if problem:
            raise PydanticCustomError("network_spec", problem)
        return self

    def problem(self) -> Optional[str]:
        """What is wrong with this spec for the network now at its path (checked again when it is opened)."""
        kind = self.kind
        if kind == "weights":
            return (f"{self.path} is not a TorchScript file (a torch.save state_dict or pickled model is not a network on its "
                    "own): save the network with torch.jit.save(torch.jit.script(net)), or give its architecture as an import "
                    f"path with these weights: {{path: package.module:Factory, weights: {self.path}, normalize: ...}}")
        if kind == "torchscript" and is_broken_archive(Path(self.path)):
            return (f"{self.path} is a truncated or corrupt TorchScript file (a zip archive cut short: its directory is missing); "
                    "copy or save it again")
        if kind == "kbricks" and self.normalize is not None:
            return f"{self.path} is a kbricks run: it records its own input normalisation; remove normalize"
        if kind in ("torchscript", "exported", "import", "zoo") and self.normalize is None:
            what = {"torchscript": "a TorchScript file", "exported": "a torch.export file", "import": "a Python import path",
                    "zoo": "a zoo model"}[kind]
            return (f"{self.path} is {what}: state its input convention with normalize: none (it takes the data as loaded, "
                    "images in [0, 1]) or normalize: {mean: [...], std: [...]}, e.g. {path: " + self.path + ", normalize: none}")
        if kind not in ("import", "zoo", "missing") and (self.kwargs or self.weights):
            return f"kwargs and weights go with an import path package.module:factory or a zoo model, not with {self.path}"
        if self.weights_key and not self.weights:
            return "weights_key needs weights"
        return None

    @property
    def kind(self) -> str:
        return path_kind(self.path)

    def describe(self) -> str:
        return self.path

    @property
    def feature_layer(self) -> Optional[str]:
        """Where features are read: ``features`` if set, else the input of a named ``head``, else None (by execution)."""
        return self.features or (f"{self.head}:input" if self.head else None)

    def to_json(self) -> Union[str, Dict[str, Any]]:
        """The spec as it would be written in a config (a bare path when nothing else is set)."""
        d = self.model_dump(mode="json", exclude_defaults=True)
        return d["path"] if list(d) == ["path"] else d


NetworkRef = Union[str, Dict[str, Any], NetworkSpec]


def as_spec(ref: NetworkRef, where: str = "network") -> NetworkSpec:
    if isinstance(ref, NetworkSpec):
        return ref
    try:
        return NetworkSpec.model_validate(ref)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "".join(f".{p}" for p in first["loc"] if isinstance(p, str))
        raise ConfigError(f"{where}{field}: {first['msg'].removeprefix('Value error, ')}") from None

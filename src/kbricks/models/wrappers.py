"""A user's network where kbricks needs one of its own shapes: a callable as a module, a module as a classifier."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._probe import probe
from .taps import FeatureTap, find_head


class CallableNetwork(nn.Module):
    """Any callable returning logits (a function, a bound ``predict``), as a module without parameters."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PointwiseHead(nn.Module):
    """A 1x1-convolution classifier (timm's ResNetV2 ``head.fc``) applied to features ``[B, C]``: the same weights, as a
    linear map. The convolution stays where it is (held in a tuple, not registered twice), so training this head
    trains the network's own layer."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self._conv = (conv,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        conv = self._conv[0]
        return F.linear(z.flatten(1), conv.weight.flatten(1), conv.bias)


def as_head(layer: nn.Module, where: str) -> nn.Module:
    """A classifier layer usable on features ``[B, C]``: an ``nn.Linear`` as it is, a pointwise ``nn.Conv2d`` through
    :class:`PointwiseHead`; anything else is refused in one line."""
    if isinstance(layer, nn.Linear):
        return layer
    if (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.groups == 1
            and layer.dilation == (1, 1) and layer.padding in ((0, 0), "valid")):
        return PointwiseHead(layer)
    raise ConfigError(f"{where} is a {type(layer).__name__}; a head must be an nn.Linear or a 1x1 nn.Conv2d "
                      "(name another layer with head:, or give the network a features(x) method)")


class ForeignClassifier(nn.Module):
    """A user's ``nn.Module`` used where kbricks needs a classifier (a student, a CKN or TSN backbone): its forward is
    the module's; ``head`` is the layer whose output is the module's output, ``features`` that layer's input, both
    found by running the module once (:func:`models.taps.find_head`) unless ``head`` / ``features`` name layers.
    Nothing is looked up until a method asks, so a network whose head cannot be found still trains as a whole."""

    def __init__(self, module: nn.Module, input_shape: Sequence[int], num_classes: int, where: str,
                 head: Optional[str] = None, features: Optional[str] = None):
        super().__init__()
        self.module = module
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.where = where
        self._head_name = head
        self._feature_layer = features
        self._tap: Optional[FeatureTap] = None
        self._head: Optional[tuple] = None
        self._feature_dim: Optional[int] = None

    def _example(self) -> torch.Tensor:
        p = next(self.module.parameters(), None)
        return torch.zeros(2, *self.input_shape, device=p.device if p is not None else "cpu")

    @property
    def head_name(self) -> str:
        if self._head_name is None:
            self._head_name = find_head(self.module, self._example(), self.where)
        return self._head_name

    @property
    def head(self) -> nn.Module:
        if self._head is None:  # a 1-tuple: a plain attribute, not a second registration of the layer
            modules = dict(self.module.named_modules())
            if self.head_name not in modules:
                raise ConfigError(f"{self.where}: the network has no layer {self.head_name!r} (head); its layers include "
                                  f"{[n for n in modules if n][:12]}")
            self._head = (as_head(modules[self.head_name], f"{self.where}: head {self.head_name!r}"),)
        return self._head[0]

    @property
    def tap(self) -> FeatureTap:
        if self._tap is None:
            self._tap = FeatureTap(self.module, self._feature_layer or f"{self.head_name}:input", self.where)
        return self._tap

    @property
    def feature_dim(self) -> int:
        if self._feature_dim is None:
            x = self._example()
            _, z = probe(self.module, x, self.where, x.shape, self.tap)
            self._feature_dim = int(z.shape[1])
        return self._feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap(x)[1]

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)

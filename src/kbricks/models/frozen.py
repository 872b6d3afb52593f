"""Frozen pretrained networks (teachers, sources, baselines): loaded without pickle and kept in eval mode.

A frozen network is named by a network spec (:mod:`kbricks.models.spec`) and opened by
:func:`kbricks.models.open.open_spec`. Its input convention comes from its run (kbricks) or from its spec
(anything else). The method's inputs, normalised with the method's own statistics, are converted to what the
network takes; one batch of the data goes through it when it is loaded, so a network that cannot take the data, or
predicts the wrong number of classes, fails in one line before training starts.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..data.tasks import Task
from ..errors import ConfigError
from ._probe import output_classes, probe
from .adapter import InputAdapter
from .card import read_model_card
from .open import build_from_card, load_trained_model, open_spec
from .spec import NetworkRef, NetworkSpec, as_spec
from .taps import FeatureTap

Output = Union[torch.Tensor, List[torch.Tensor]]


class FrozenNetwork(nn.Module):
    """Eval mode, no gradients, inputs converted to the network's convention. ``train()`` cannot switch it back.

    ``net_norm``: the statistics the network was trained with (None: it takes the data as loaded);
    ``input_norm``: those the caller normalised its inputs with (None: the caller feeds the data as loaded);
    ``input_spec``: channel map / resize / reshape between the two; ``feature_layer``: where ``features`` reads
    (None: the network's own ``features``, else the input of its head found by execution)."""

    def __init__(self, net: nn.Module, net_norm=None, input_norm=None, task_names: Optional[Sequence[str]] = None,
                 input_spec=None, feature_layer: Optional[str] = None, num_outputs: Optional[Union[int, List[int]]] = None):
        super().__init__()
        self.net = net
        self.task_names = list(task_names or [])
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.adapter = InputAdapter(input_norm, net_norm, input_spec)
        self.feature_layer = feature_layer
        self._tap: Optional[FeatureTap] = None
        self.num_outputs = num_outputs
        self.card: Dict[str, Any] = {}
        self.net_norm = net_norm
        self.source_kind: Optional[str] = None  # what the spec named: kbricks, torchscript, import, zoo, memory
        self.probe_accuracy: Optional[float] = None  # accuracy on a labelled probe of the training data (teachers)
        self.probe: Dict[str, Any] = {}
        self.net.eval()

    def train(self, mode: bool = True) -> "FrozenNetwork":
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Output:
        return self.net(self.adapter(x))

    def feature_tap(self, layers=None, where: str = "the network", pool: bool = False) -> FeatureTap:
        """A tap on the network itself (its layers see the converted inputs)."""
        return FeatureTap(self.net, layers, where, pool)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, D]: the network's own ``features`` (kbricks classifiers) unless a layer is named; otherwise
        the named layer, by default the input of the layer whose output is the network's output."""
        own = getattr(self.net, "features", None)
        if self.feature_layer is None and callable(own) and not isinstance(own, nn.Module):
            return own(self.adapter(x))
        if self._tap is None:
            self._tap = FeatureTap(self.net, self.feature_layer, "the network")
        return self._tap(self.adapter(x))[1]


def load_frozen(ref: NetworkRef, input_norm: Optional[Dict[str, Any]] = None, example: Optional[torch.Tensor] = None,
                where: str = "network") -> FrozenNetwork:
    """The frozen network ``ref`` names (a spec, its dict form, or a path string). ``input_norm``: how the caller
    normalises its inputs. ``example``: a few of the caller's inputs, run through the network once to check it."""
    spec: NetworkSpec = as_spec(ref, where)
    opened = open_spec(spec, False, where)
    frozen = FrozenNetwork(opened.module, opened.normalize, input_norm, opened.task_names, spec.input, spec.feature_layer)
    frozen.card = opened.card
    frozen.spec = spec
    frozen.source_kind = opened.kind
    if example is not None:
        check_frozen(frozen, example, opened.input_shape, f"{where} ({spec.describe()})")
    return frozen


def check_frozen(frozen: FrozenNetwork, example: torch.Tensor, trained_shape: Optional[Sequence[int]], where: str) -> None:
    """The network takes the caller's inputs (after its input conversion) and returns logits; sets ``num_outputs``."""
    with torch.no_grad():
        try:
            x = frozen.adapter(example)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except Exception as exc:
            raise ConfigError(f"{where}: its input conversion fails on data of shape {list(example.shape)}: {exc}") from None
    if trained_shape is not None and tuple(x.shape[1:]) != tuple(trained_shape):
        raise ConfigError(f"{where} was trained on inputs {list(trained_shape)} but gets {list(x.shape[1:])} from the data; "
                          "convert them with an input transform (input: {channels, size, shape}) or use matching data")
    shown = list(example.shape) if tuple(x.shape) == tuple(example.shape) else f"{list(example.shape)} -> {list(x.shape)} after its input transform"
    out = probe(frozen.net, x, where, shown)
    frozen.num_outputs = output_classes(out, where, example.shape[0])


def task_logits(output: Output, task: Task, head_names: Sequence[str]) -> torch.Tensor:
    """The teacher's logits for one task: its head of the same name (multi-head) or its task classes (single head)."""
    if isinstance(output, (list, tuple)):
        if task.name not in head_names:
            raise ConfigError(f"the teacher has no head for task {task.name!r}; its heads are {list(head_names)}")
        return output[list(head_names).index(task.name)]
    if task.classes is None:
        raise ConfigError(f"task {task.name!r} is a latent task but the teacher has a single classification head")
    return output[:, list(task.classes)]


# kept importable from here: the kbricks run format moved to models.card / models.open
__all__ = ["FrozenNetwork", "load_frozen", "check_frozen", "task_logits", "read_model_card", "build_from_card", "load_trained_model"]

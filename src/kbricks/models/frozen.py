"""Frozen pretrained networks (teachers, sources, baselines): loaded without pickle and kept in eval mode.

A frozen network is named by a network spec (``models.foreign``): a kbricks run directory (``model.json`` +
``model.safetensors``, its fingerprint checked), a TorchScript file, an import path with a weights file, or an object
handed to the Python API. Its input convention comes from its run (kbricks) or from its spec (anything else). The
method's inputs, normalised with the method's own statistics, are converted to what the network takes; one batch
of the data goes through it when it is loaded, so a network that cannot take the data, or predicts the wrong
number of classes, fails in one line before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.checkpoint import fingerprint, load_safetensors, load_state_into, read_json
from ..data.tasks import Task
from ..errors import CheckpointError, ConfigError
from .foreign import FeatureTap, InputAdapter, NetworkRef, NetworkSpec, as_spec, open_network, output_classes, probe
from .heads import MultiHeadClassifier

Output = Union[torch.Tensor, List[torch.Tensor]]


def read_model_card(path: Union[str, Path]) -> Tuple[Dict[str, Any], Path]:
    """``path`` is a run directory or its ``model.json``; returns (card, directory)."""
    p = Path(path)
    card_path = p / "model.json" if p.is_dir() else p
    card = read_json(card_path, f"no trained model at {str(path)!r} (expected a run directory with model.json)")
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path} is not a kbricks model card (a JSON object is expected, got {type(card).__name__})")
    if [k for k in ("model", "num_classes", "in_channels", "image_size") if k not in card] or not isinstance(card["model"], dict):
        raise CheckpointError(f"{card_path} is not a kbricks model card (it lacks model, num_classes, in_channels or image_size)")
    if card.get("network", "classifier") != "classifier":
        raise CheckpointError(f"{card_path} describes a {card.get('method')!r} run whose network is {card.get('network')!r}, not one classifier; load its bricks instead")
    return card, card_path.parent


def build_from_card(card: Dict[str, Any]) -> nn.Module:
    latent = [t for t in card.get("tasks", []) if t.get("latent") is not None]
    n_out = 0 if latent else card["num_classes"]
    from . import create_model  # registered names and user networks alike

    image_size = card["image_size"]
    net = create_model(card["model"]["name"], num_classes=n_out, in_channels=card["in_channels"],
                        image_size=tuple(image_size) if isinstance(image_size, list) else image_size, **card["model"].get("kwargs", {}))
    return MultiHeadClassifier(net, [t["num_classes"] for t in latent]) if latent else net


def load_trained_model(path: Union[str, Path], verify: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """The classifier of a kbricks run; with ``verify`` its weights must hash to the card's fingerprint."""
    card, folder = read_model_card(path)
    net, tensors = build_from_card(card), load_safetensors(folder / "model.safetensors")
    if verify and card.get("fingerprint") is not None and fingerprint(tensors) != card["fingerprint"]:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match the fingerprint in {folder / 'model.json'} "
                              "(modified or corrupt): refusing it")
    load_state_into(net, tensors, f"model described by {folder / 'model.json'}")
    return net, card


class FrozenNetwork(nn.Module):
    """Eval mode, no gradients, inputs converted to the network's convention. ``train()`` cannot switch it back.

    ``net_norm``: the statistics the network was trained with (None: it takes the data as loaded);
    ``input_norm``: those the caller normalised its inputs with (None: the caller feeds the data as loaded);
    ``input_spec``: channel map / resize / reshape between the two; ``feature_layer``: where ``features`` reads."""

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
        self.net.eval()

    def train(self, mode: bool = True) -> "FrozenNetwork":
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Output:
        return self.net(self.adapter(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, D]: the network's own ``features`` (kbricks classifiers) unless a layer is named; otherwise
        the named layer, by default the input of the last ``nn.Linear``."""
        own = getattr(self.net, "features", None)
        if self.feature_layer is None and callable(own) and not isinstance(own, nn.Module):
            return own(self.adapter(x))
        if self._tap is None:
            self._tap = FeatureTap(self.net, self.feature_layer, "features")
        return self._tap(self.adapter(x))[1]


def load_frozen(ref: NetworkRef, input_norm: Optional[Dict[str, Any]] = None, example: Optional[torch.Tensor] = None,
                where: str = "network") -> FrozenNetwork:
    """The frozen network ``ref`` names (a spec, its dict form, or a path string). ``input_norm``: how the caller
    normalises its inputs. ``example``: a few of the caller's inputs, run through the network once to check it."""
    spec: NetworkSpec = as_spec(ref, where)
    opened = open_network(spec, where)
    frozen = FrozenNetwork(opened.module, opened.normalize, input_norm, opened.task_names, spec.input, spec.features)
    frozen.card = opened.card
    frozen.spec = spec
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

"""Frozen pretrained networks (teachers, sources, baselines): loaded without pickle and kept in eval mode.

A run directory written by ``kbricks train`` holds ``model.safetensors`` and ``model.json`` (architecture,
classes, tasks, input normalisation). A teacher trained with other normalisation statistics than the student's
pipeline is fed correctly: inputs are re-normalised from the student's statistics to the teacher's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.checkpoint import fingerprint, load_safetensors, load_state_into, read_json
from ..data.tasks import Task
from ..errors import CheckpointError, ConfigError
from .base import MODELS
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
    net = MODELS.create(card["model"]["name"], num_classes=n_out, in_channels=card["in_channels"], image_size=card["image_size"], **card["model"].get("kwargs", {}))
    return MultiHeadClassifier(net, [t["num_classes"] for t in latent]) if latent else net


def load_trained_model(path: Union[str, Path]) -> Tuple[nn.Module, Dict[str, Any]]:
    card, folder = read_model_card(path)
    net, tensors = build_from_card(card), load_safetensors(folder / "model.safetensors")
    if card.get("fingerprint") is not None and fingerprint(tensors) != card["fingerprint"]:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match the fingerprint in {folder / 'model.json'} (modified or corrupt)")
    load_state_into(net, tensors, f"model described by {folder / 'model.json'}")
    return net, card


class FrozenNetwork(nn.Module):
    """Eval mode, no gradients, re-normalised inputs. ``train()`` cannot switch it back to training mode."""

    def __init__(self, net: nn.Module, net_norm=None, input_norm=None, task_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.net = net
        self.task_names = list(task_names or [])
        for p in self.net.parameters():
            p.requires_grad_(False)
        scale, shift = self._affine(net_norm, input_norm)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.net.eval()

    @staticmethod
    def _affine(net_norm, input_norm):
        # x_net = (x_in * s_in + m_in - m_net) / s_net ; identity where statistics are absent
        def stats(norm):
            if not norm or norm.get("mean") is None:
                return None
            return torch.tensor(norm["mean"]).view(1, -1, 1, 1), torch.tensor(norm["std"]).view(1, -1, 1, 1)

        n, i = stats(net_norm), stats(input_norm)
        m_in, s_in = i if i else (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
        m_net, s_net = n if n else (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
        return s_in / s_net, (m_in - m_net) / s_net

    def train(self, mode: bool = True) -> "FrozenNetwork":
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Output:
        return self.net(x * self.scale + self.shift)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x * self.scale + self.shift)


def load_frozen(path: Union[str, Path], input_norm: Optional[Dict[str, Any]] = None) -> FrozenNetwork:
    net, card = load_trained_model(path)
    names = [t["name"] for t in card.get("tasks", []) if t.get("latent") is not None]
    frozen = FrozenNetwork(net, card.get("normalize"), input_norm, names)
    frozen.card = card
    return frozen


def task_logits(output: Output, task: Task, head_names: Sequence[str]) -> torch.Tensor:
    """The teacher's logits for one task: its head of the same name (multi-head) or its task classes (single head)."""
    if isinstance(output, (list, tuple)):
        if task.name not in head_names:
            raise ConfigError(f"the teacher has no head for task {task.name!r}; its heads are {list(head_names)}")
        return output[list(head_names).index(task.name)]
    if task.classes is None:
        raise ConfigError(f"task {task.name!r} is a latent task but the teacher has a single classification head")
    return output[:, list(task.classes)]

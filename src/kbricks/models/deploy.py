"""Networks ready to deploy: they carry their input normalisation, so they take *raw* inputs, the tensors a dataset
holds before kbricks normalises them (images ``[N, C, H, W]`` in [0, 1] for the built-in datasets), the same input
the teacher's whole pipeline took.

``load_model(run_dir)`` rebuilds the network a ``kbricks train`` run exported (``model.json`` +
``model.safetensors``), checks its weights against the card's fingerprint and wraps it with the run's normalisation.
Everything here is scriptable with ``torch.jit.script`` and exportable to ONNX.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..config import normalization_problem
from ..core.checkpoint import fingerprint, load_safetensors, load_state_into
from ..errors import CheckpointError
from .frozen import build_from_card, read_model_card

RAW_INPUT = ("raw: the tensors the dataset holds, before kbricks normalises them (images [N, C, H, W] in [0, 1] "
             "for the built-in datasets); the network normalises them itself")


class InputNormalization(nn.Module):
    """``(x - mean) / std`` with one statistic per channel (dim 1), broadcast over the other dims, so the same
    layer serves images ``[N, C, H, W]`` and feature vectors ``[N, D]``. Buffers: they follow ``.to(device)`` and
    are baked into TorchScript and ONNX exports."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise CheckpointError(f"input normalisation needs as many means as stds (got {len(mean)} and {len(std)})")
        problem = normalization_problem(mean, std)
        if problem:  # a hand-edited card: NaN/inf/0 statistics would make every output NaN
            raise CheckpointError(f"the network's input normalisation is unusable: {problem}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - self.mean.to(x.dtype).view(shape)) / self.std.to(x.dtype).view(shape)


def input_normalization(normalize: Optional[Dict[str, Any]]) -> nn.Module:
    """The layer for a manifest's ``normalize`` entry ({mean, std}; None or null statistics: identity)."""
    if not normalize or normalize.get("mean") is None:
        return nn.Identity()
    return InputNormalization(normalize["mean"], normalize["std"])


def input_shape_of(spec: Dict[str, Any]) -> Optional[List[int]]:
    """Per-sample input shape from an architecture entry or a model card: ``input_shape`` when recorded, else
    ``[in_channels, image_size, image_size]`` (``image_size`` may also be ``[H, W]``; a recorded null ``image_size``
    means feature vectors: ``[in_channels]``)."""
    if spec.get("input_shape") is not None:
        return [int(s) for s in spec["input_shape"]]
    if spec.get("in_channels") is not None and "image_size" in spec and spec["image_size"] is None:
        return [int(spec["in_channels"])]
    if spec.get("in_channels") is None or spec.get("image_size") is None:
        return None
    size = spec["image_size"]
    hw = [int(s) for s in size] if isinstance(size, (list, tuple)) else [int(size), int(size)]
    return [int(spec["in_channels"]), *hw]


class NormalizedNetwork(nn.Module):
    """A trained network behind its input normalisation: ``forward(raw) = net(normalize(raw))``. ``info`` says
    what it is (input shape and convention, outputs, classes, fingerprint)."""

    __jit_ignored_attributes__ = ["info", "card"]

    def __init__(self, net: nn.Module, normalize: Optional[Dict[str, Any]], info: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.normalize = input_normalization(normalize)
        self.net = net
        self.info = dict(info or {})

    def forward(self, x: torch.Tensor):
        return self.net(self.normalize(x))


def load_model(path: Union[str, Path]) -> NormalizedNetwork:
    """The network a ``kbricks train`` run exported (run directory or its ``model.json``), in eval mode, taking raw
    inputs. Weights that do not hash to the card's fingerprint are refused."""
    card, folder = read_model_card(path)
    if not card.get("fingerprint"):
        raise CheckpointError(f"{folder / 'model.json'} has no fingerprint to check model.safetensors against")
    tensors = load_safetensors(folder / "model.safetensors")
    if fingerprint(tensors) != card["fingerprint"]:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match the fingerprint in model.json (modified or corrupt file)")
    net = build_from_card(card)
    load_state_into(net, tensors, f"model described by {folder / 'model.json'}")
    latent = [t["name"] for t in card.get("tasks", []) if t.get("latent") is not None]
    info = {
        "kind": "model",
        "source": str(folder),
        "fingerprint": card["fingerprint"],
        "input": {"shape": input_shape_of(card), "normalize": card.get("normalize"), "convention": RAW_INPUT},
        "outputs": [f"logits_{n}" for n in latent] if latent else ["logits"],
        "class_names": card.get("classes"),
    }
    wrapped = NormalizedNetwork(net, card.get("normalize"), info).eval()
    wrapped.card = card
    return wrapped

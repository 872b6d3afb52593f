"""Reading the files a network spec can name: TorchScript archives and weights (no pickle anywhere)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..core.checkpoint import load_safetensors
from ..errors import CheckpointError, ConfigError
from .exported import open_exported


def exception_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for one-line errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


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


def load_exported(path: str, where: str) -> nn.Module:
    """A ``torch.export.save`` file's network, its archive checked for pickled parts first (:mod:`.exported`)."""
    if not Path(path).exists():
        raise ConfigError(f"{where}: {path!r} does not exist")
    return open_exported(path, where)


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

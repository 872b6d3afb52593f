"""Reading the files a network spec can name: TorchScript archives and weights (no pickle anywhere).

Every zip archive (TorchScript, ``torch.save``) has its CRCs checked before it is used: ``torch.jit.load`` does not,
so a flipped byte inside a weight tensor would load silently. A truncated archive, a pickled object and weights of
another kind of dtype than the network's are refused in one line.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from ..core.checkpoint import load_safetensors, torch_load_detail, unpickling_refusal
from ..core.io import first_line
from ..errors import CheckpointError, ConfigError
from .exported import open_exported

ZIP_MAGIC = b"PK\x03\x04"


def exception_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for one-line errors."""
    return first_line(exc, with_type=True)


def starts_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ZIP_MAGIC
    except OSError:
        return False


def is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def is_broken_archive(path: Path) -> bool:
    """A file that starts as a zip archive (TorchScript, torch.save) but whose directory cannot be read: cut short."""
    if not starts_like_zip(path):
        return False
    try:
        with zipfile.ZipFile(path):
            return False
    except (zipfile.BadZipFile, OSError, ValueError):
        return True


def archive_problem(path: Path, what: str) -> Optional[str]:
    """Why the zip archive at ``path`` cannot be trusted: unreadable (truncated) or a member whose CRC does not match
    (corrupt); None when every member reads back intact."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        return f"{what} {path} is truncated or corrupt (not a complete zip archive: {exception_line(exc)}); copy or save it again"
    except Exception as exc:  # zlib errors inside a compressed member
        return f"{what} {path} is corrupt ({exception_line(exc)}); copy or save it again"
    if bad is not None:
        return f"{what} {path}: file is corrupt (CRC mismatch in {bad}); copy or save it again"
    return None


def load_torchscript(path: str, where: str) -> nn.Module:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{where}: {path!r} does not exist (expected a kbricks run directory, model.json, a TorchScript file "
                          "or an import path package.module:factory)")
    if is_broken_archive(p):
        raise CheckpointError(f"{where}: {archive_problem(p, 'TorchScript file')}")
    if not is_torchscript_archive(p):
        raise ConfigError(
            f"{where}: {path} is not a TorchScript file; a torch.save state_dict or pickled model is not a network on its own: "
            "save it with torch.jit.save(torch.jit.script(net)), or give its architecture as an import path "
            f"{{path: package.module:Factory, weights: {path}}}")
    problem = archive_problem(p, "TorchScript file")
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    try:
        return torch.jit.load(str(p), map_location="cpu").eval()
    except Exception as exc:
        raise CheckpointError(f"{where}: TorchScript file {path} is corrupt or unreadable ({first_line(exc, 200)})") from None


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
    if starts_like_zip(p):
        problem = archive_problem(p, "weights file")
        if problem:
            raise CheckpointError(f"{where}: {problem}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        refusal = unpickling_refusal(exc, path)
        if refusal:
            raise CheckpointError(f"{where}: {refusal}") from None
        raise CheckpointError(f"{where}: {path} cannot be read as weights (a .safetensors file or a torch.save state_dict of "
                              f"tensors is expected): {torch_load_detail(exc)}") from None
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


def check_weight_dtypes(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Weights whose dtype differs from the network's tensor would be cast silently by ``load_state_dict``
    (integers into a float network, and float64 / float16 precision too): refused in one line naming them, as
    :func:`kbricks.core.checkpoint.load_state_into` refuses them in checkpoints."""
    own = module.state_dict()
    wrong = [f"{k}: {str(v.dtype).removeprefix('torch.')} in the file, {str(own[k].dtype).removeprefix('torch.')} in the network"
             for k, v in state.items()
             if k in own and isinstance(own[k], torch.Tensor) and v.dtype != own[k].dtype]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(f"{where}: weights of the wrong dtype would be cast silently: {'; '.join(wrong[:3])}{more}; "
                              "convert them (e.g. {k: v.float() for k, v in state.items()}) and save again")

"""Checkpoints: plain containers written atomically, loaded with ``weights_only=True``; safetensors for sharing."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from .io import atomic_write_bytes, first_line

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "load_state_into", "remap_prefix", "save_safetensors",
           "load_safetensors", "read_json", "fingerprint", "is_growable", "canonical_json", "sign_claims", "claim_digests",
           "edited_claims", "verify_claims"]

FORMAT = "kbricks-checkpoint-v1"


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    payload = {"format": FORMAT, **state}
    atomic_write_bytes(Path(path), lambda f: torch.save(payload, f), what="the checkpoint")


def unpickling_refusal(exc: BaseException, path: str) -> Optional[str]:
    """The refusal of a file ``torch.load(weights_only=True)`` would need code to read (a pickled model or any other
    object), without torch's advice to switch the protection off; None for other errors."""
    text = str(exc)
    if "Unsupported global" not in text and "GLOBAL" not in text:  # garbage bytes are corrupt, not code
        return None
    named = re.search(r"GLOBAL ([\w.]+)", text)
    holds = f" (it refers to {named.group(1)})" if named else ""
    return (f"{path} needs code to unpickle{holds}: kbricks reads torch.save files with weights_only=True and loads only "
            "weights (.safetensors, or a state_dict of tensors), TorchScript files and kbricks runs, never pickled objects; "
            "save net.state_dict() instead "
            "(safetensors.torch.save_file or torch.save), or the network with torch.jit.save(torch.jit.script(net))")


def torch_load_detail(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` could not read, in one line, without torch's preamble (which advises
    switching the protection off)."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return first_line(exc, with_type=True)
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")
    detail = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return detail[0] if detail else "an unreadable pickle stream"


def load_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refusal = unpickling_refusal(exc, str(path))
        if refusal:
            raise CheckpointError(f"checkpoint {refusal}") from None
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a kbricks checkpoint ({torch_load_detail(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a kbricks checkpoint (no {FORMAT!r} marker)")
    return state


def load_state_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """``load_state_dict`` with a readable error listing missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and isinstance(own[k], torch.Tensor) and isinstance(state_dict[k], torch.Tensor)
        and tuple(state_dict[k].shape) != tuple(own[k].shape) and not is_growable(k)
    ]
    # load_state_dict would cast silently (int32 weights into a float network train as garbage): refuse instead
    dtypes = [
        f"{k}: checkpoint {str(state_dict[k].dtype).replace('torch.', '')} vs model {str(own[k].dtype).replace('torch.', '')}"
        for k in own
        if k in state_dict and isinstance(own[k], torch.Tensor) and isinstance(state_dict[k], torch.Tensor)
        and state_dict[k].dtype != own[k].dtype
    ]
    if missing or unexpected or shapes or dtypes:
        parts: List[str] = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        if dtypes:
            parts.append(f"dtype mismatch in {len(dtypes)} tensor(s) " + "; ".join(dtypes[:3]) + (" ..." if len(dtypes) > 3 else "")
                         + " (weights are never cast: convert the file to the network's dtypes, e.g. with .float(), and save it again)")
        raise CheckpointError(f"checkpoint does not match the {what}: " + ", ".join(parts))
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not match the {what}: {first_line(exc)}") from None


def is_growable(key: str) -> bool:
    """Buffers whose first dimension grows as a continual run sees tasks (per-task BatchNorm statistics)."""
    return key.endswith(("running_mean", "running_var")) and "." in key


def remap_prefix(state_dict: Mapping[str, torch.Tensor], old: str, new: str = "") -> Dict[str, torch.Tensor]:
    """Rename keys ``old...`` -> ``new...`` (e.g. strip ``module.`` from DDP or ``classifier.`` from mmcls)."""
    return {(new + k[len(old):]) if k.startswith(old) else k: v for k, v in state_dict.items()}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data, what="the weights")


def load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        return load(path.read_bytes())
    except Exception as exc:
        raise CheckpointError(f"weights file {str(path)!r} is corrupt or not safetensors ({first_line(exc)})") from None


def read_json(path: Path, missing: str) -> Any:
    """A JSON document from disk; ``missing`` is the error message when the file does not exist."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a JSON document ({first_line(exc, 120, with_type=True)})") from None


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and values), order-independent."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---- signed claims ----------------------------------------------------------------------------------------------
# A model card or brick manifest claims things its loader acts on (normalisation, classes, input shape, tasks,
# architecture). They are signed together with the weights' fingerprint, so a hand-edited claim is refused as surely
# as edited weights. Content hashes, not keyed signatures: they catch edits and corruption, not forgery.


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that is hashed: sorted keys, no whitespace (a JSON round trip keeps it)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def sign_claims(claims: Mapping[str, Any], weights_fingerprint: str = "") -> str:
    """The signature of ``claims`` (a JSON object: every field a loader acts on) bound to the weights they describe."""
    h = hashlib.sha256(weights_fingerprint.encode())
    h.update(canonical_json(dict(claims)).encode())
    return h.hexdigest()[:16]


def claim_digests(claims: Mapping[str, Any]) -> Dict[str, str]:
    """One short hash per claim, stored beside the signature so that a refusal can name the edited field."""
    return {k: hashlib.sha256(canonical_json(v).encode()).hexdigest()[:8] for k, v in claims.items()}


def changed_claims(claims: Mapping[str, Any], digests: Mapping[str, Any]) -> List[str]:
    """The claims that were edited, added or removed since ``digests`` were recorded."""
    now = claim_digests(claims)
    return sorted(k for k in set(now) | set(digests) if now.get(k) != digests.get(k))


def edited_claims(claims: Mapping[str, Any], weights_fingerprint: str, signature: Any,
                  digests: Optional[Mapping[str, Any]]) -> Optional[List[str]]:
    """None when ``claims`` hash to ``signature``; else the edited claims (named by the recorded ``digests``, an
    empty list when they cannot tell which)."""
    if isinstance(signature, str) and sign_claims(claims, weights_fingerprint) == signature:
        return None
    return changed_claims(claims, digests) if isinstance(digests, Mapping) else []


def quote_fields(names: List[str]) -> str:
    """``'normalize'`` / ``'classes', 'tasks'``: the edited fields as a refusal names them."""
    return ", ".join(repr(k) for k in names[:4]) + (" ..." if len(names) > 4 else "")


def verify_claims(claims: Mapping[str, Any], weights_fingerprint: str, signature: Any, digests: Optional[Mapping[str, Any]],
                  what: str, fix: str) -> None:
    """Refuse ``claims`` that do not hash to ``signature`` with one line naming the edited field(s) when the recorded
    ``digests`` tell which, else saying that the claims do not match their signature."""
    changed = edited_claims(claims, weights_fingerprint, signature, digests)
    if changed is None:
        return
    if changed:
        verb = "differs" if len(changed) == 1 else "differ"
        raise CheckpointError(f"{what} was edited after it was written: {quote_fields(changed)} {verb} from what was signed; {fix}")
    raise CheckpointError(f"{what}: its claims do not match their signature (edited or corrupt); {fix}")

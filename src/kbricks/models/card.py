"""Reading a kbricks run's model card (``model.json``): what a trained classifier is, as the engine wrote it.

Every field a loader acts on (architecture, network kind, classes, input shape, normalisation, tasks, plugin
imports, whatever the method added) is a *claim*, signed with the weights' fingerprint (``signature``, with one
short hash per claim in ``claim_digests`` so that a refusal names the edited field). Only ``metrics`` (results) and
the signing fields themselves are unsigned. A card written before cards were signed is accepted with one warning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Set, Tuple, Union

from ..core.checkpoint import claim_digests, read_json, sign_claims, verify_claims
from ..errors import CheckpointError

UNSIGNED = ("fingerprint", "metrics", "signature", "claim_digests")  # fingerprint: signed as the weights' hash
_warned_unsigned: Set[str] = set()


def card_claims(card: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of a card that its signature covers, as they read back from JSON."""
    return json.loads(json.dumps({k: v for k, v in card.items() if k not in UNSIGNED}))


def sign_card(card: Dict[str, Any]) -> Dict[str, Any]:
    """``card`` with its ``signature`` and ``claim_digests`` (call it last: any later change invalidates them)."""
    claims = card_claims(card)
    return {**card, "signature": sign_claims(claims, str(card.get("fingerprint") or "")), "claim_digests": claim_digests(claims)}


def verify_card(card: Dict[str, Any], card_path: Path) -> None:
    """Refuse a card whose claims were edited after training; warn once about a card that has no signature."""
    if "signature" not in card:
        if str(card_path) not in _warned_unsigned:
            _warned_unsigned.add(str(card_path))
            print(f"kbricks: warning: {card_path} has no signature (written before kbricks signed model cards): its "
                  "normalize, classes and architecture are used as written; retrain to sign it", file=sys.stderr)
        return
    verify_claims(card_claims(card), str(card.get("fingerprint") or ""), card["signature"], card.get("claim_digests"),
                  str(card_path), "restore it or retrain")


def read_model_card(path: Union[str, Path]) -> Tuple[Dict[str, Any], Path]:
    """``path`` is a run directory or its ``model.json``; returns (card, directory), its signature checked."""
    p = Path(path)
    card_path = p / "model.json" if p.is_dir() else p
    card = read_json(card_path, f"no trained model at {str(path)!r} (expected a run directory with model.json)")
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path} is not a kbricks model card (a JSON object is expected, got {type(card).__name__})")
    if [k for k in ("model", "num_classes", "in_channels", "image_size") if k not in card] or not isinstance(card["model"], dict):
        raise CheckpointError(f"{card_path} is not a kbricks model card (it lacks model, num_classes, in_channels or image_size)")
    verify_card(card, card_path)
    if card.get("network", "classifier") != "classifier":
        raise CheckpointError(f"{card_path} describes a {card.get('method')!r} run whose network is {card.get('network')!r}, not one classifier; load its bricks instead")
    return card, card_path.parent

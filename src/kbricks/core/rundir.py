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
from typing import Any, Optional, Set

from ..errors import ConfigError
from .io import atomic_write_text, writable_dir

try:  # POSIX advisory locks; elsewhere runs are simply not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# any of these means the directory holds (part of) a run: starting over it needs --resume or --overwrite
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "model.json", "ckpt")
# what only kbricks writes: --overwrite deletes a directory's contents only when one of these says it is a run
RUN_MARKERS = ("env.json", "ckpt")
# what shows that a run got somewhere (a directory with only these missing holds nothing to lose)
RESULT_FILES = ("metrics.jsonl", "results.json", "model.json")


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_path(out_dir: str, name: str, seed: int) -> Path:
    """``<out_dir>/<name>/<date-time>-seed<seed>``, made unique (``-2``, ``-3`` ...) by creating it atomically, so
    two runs started in the same second never share a directory."""
    base = Path(out_dir) / name
    if base.exists() and not base.is_dir():
        raise ConfigError(f"out_dir: {str(base)!r} is a file, not a directory")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out_dir: cannot create {str(base)!r} ({exc.strerror or exc})") from None
    stamp = _stamp()
    for i in range(1, 10_000):
        path = base / (f"{stamp}-seed{seed}" + (f"-{i}" if i > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"out_dir: cannot create a run directory in {str(base)!r} ({exc.strerror or exc})") from None
    raise ConfigError(f"could not find a free run directory name under {base}")


def _has_results(path: Path) -> bool:
    return any((path / f).exists() and (path / f).stat().st_size > 0 for f in RESULT_FILES)


class RunDirectory:
    """Owns one run directory for the life of a run (rank 0 only; other ranks only read the path)."""

    def __init__(self, path: Path, created: bool, preexisting: Optional[Set[str]] = None):
        self.path = Path(path)
        self.ckpt_dir = self.path / "ckpt"
        self.created = created
        # entries that were there before this run (None: the directory held a run, abandon() leaves it alone)
        self.preexisting = preexisting if preexisting is not None else (set() if created else None)
        self.default_name = False
        self._lock_file = None

    @classmethod
    def open(cls, path: Optional[Path], out_dir: str, name: str, seed: int, resume: bool, overwrite: bool = False) -> "RunDirectory":
        """Check the target, create it and take the lock, then decide: refuses to start over an existing run
        unless ``resume`` (continue it) or ``overwrite`` (delete it first). Everything is decided under the lock,
        so two processes can never both pass the checks."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass one of them")
        global _last_opened
        if path is None:
            run = cls(default_run_path(out_dir, name, seed), created=True)
            run.default_name = True
            run.lock()
            _last_opened = run
            return run
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run directory {str(path)!r} is a file, not a directory")
        existed = path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            if not existed and path.exists():
                shutil.rmtree(path, ignore_errors=True)
            raise ConfigError(f"run directory {str(path)!r} is not writable ({exc.strerror or exc})") from None
        before = {p.name for p in path.iterdir()}
        run = cls(path, created=not existed, preexisting=before)
        run.lock()
        try:
            run._check_start(resume, overwrite)
        except BaseException:
            run.abandon()
            raise
        _last_opened = run
        return run

    def _check_start(self, resume: bool, overwrite: bool) -> None:
        path = self.path
        holds_run = any((path / f).exists() for f in RUN_FILES)
        if not holds_run:
            return
        if not (resume or overwrite):
            raise ConfigError(f"run directory {str(path)!r} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --run-dir")
        if resume:
            if not self.has_checkpoint() and _has_results(path):
                raise ConfigError(f"cannot resume {str(path)!r}: it holds results but no checkpoint (ckpt/last.pt is missing); "
                                  "pass --overwrite to start it again, or choose another --run-dir")
            self.preexisting = None  # an existing run: a failure from here on must not delete anything
            if self.ckpt_dir.exists():  # fail now, not after an epoch whose checkpoint cannot be saved
                writable_dir(self.ckpt_dir, "checkpoint directory")
            return
        if not any((path / f).exists() for f in RUN_MARKERS):
            raise ConfigError(f"refusing to --overwrite {str(path)!r}: it does not look like a kbricks run directory "
                              "(no env.json or ckpt/); choose another --run-dir or empty it yourself")
        for f in path.iterdir():
            if f.name != ".lock":
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        self.preexisting = set()

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
            raise ConfigError(f"run directory {str(self.path)!r} is in use by {owner}; wait for it to finish or choose another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._lock_file = f  # held until release() or process exit (the OS drops it on a crash or kill -9)

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ---- files ---------------------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2), what=name)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text, what=name)

    def has_checkpoint(self) -> bool:
        return (self.ckpt_dir / "last.pt").exists()

    def abandon(self) -> bool:
        """A start that failed before its first checkpoint: remove what this run wrote (the whole directory if
        this run created it). An existing run (resumed) is never touched. Returns whether anything was removed."""
        self.release()
        if self.preexisting is None or self.has_checkpoint() or not self.path.exists():
            return False
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.default_name:
                try:  # <out_dir>/<name>, when this run was its only content
                    self.path.parent.rmdir()
                except OSError:
                    pass
            return True
        for f in self.path.iterdir():
            if f.name not in self.preexisting:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        return True


_last_opened: Optional[RunDirectory] = None


def interrupted_note() -> str:
    """What a user should know after Ctrl-C: where the run is and whether it can be resumed."""
    run = _last_opened
    if run is None:
        return "no run directory was opened"
    if run.has_checkpoint():
        return f"resume with --resume --run-dir {run.path}"
    if not run.path.exists() or (run.preexisting is not None and not any((run.path / f).exists() for f in RUN_FILES)):
        return f"stopped before the first checkpoint: nothing to resume, and {run.path} was cleaned up"
    return f"{run.path} holds no checkpoint yet (nothing to resume)"

"""Seeding, device choice and thread count: everything that decides how a run executes."""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (run seed, epoch, rank...), so each epoch can be replayed exactly."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a clear error otherwise."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name}: CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: only {torch.cuda.device_count()} CUDA device(s) are present")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device={name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device: unsupported device type {device.type!r}; use auto, cpu, cuda or mps")
    return device


_default_threads: Optional[int] = None  # set by a worker pool for the runs its worker starts


def use_default_threads(n: Optional[int]) -> None:
    """Make ``n`` the thread count of every run this process starts that does not choose one (a worker of
    :mod:`kbricks.engine.parallel`); None goes back to ``KBRICKS_THREADS`` / 1."""
    global _default_threads
    _default_threads = n


def default_threads() -> int:
    """Intra-op threads when the run does not choose (``train.num_threads``): ``KBRICKS_THREADS``, else **1**.

    kbricks trains small networks on CPU, where a second intra-op thread buys little and one descheduled thread
    stalls every parallel operation once another process competes for the cores (2.4-13x slower steps with one busy
    neighbour on 2 cores). So each process uses one thread and the cores are used by running independent runs in
    parallel processes (``kbricks sweep`` / ``reproduce`` ``--workers``; DDP ranks are processes too). A lone run on
    an otherwise idle machine may be faster with more: ``KBRICKS_THREADS=N`` or ``-o train.num_threads=N``
    (``make bench`` measures 1 vs 2 threads, idle and next to a busy process). The same thread count everywhere
    also means a run gives the same numbers alone, in a sweep or in a study."""
    if _default_threads:
        return _default_threads
    env = os.environ.get("KBRICKS_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ConfigError(f"KBRICKS_THREADS must be a whole number of threads, got {env!r}") from None
    return 1


def set_threads(n: int | None) -> int:
    """Set torch's intra-op thread count (``n`` or the default above); returns the value in effect."""
    n = n or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

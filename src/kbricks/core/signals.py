"""SIGTERM handled like Ctrl-C: a scheduler's stop (SLURM, Kubernetes, ``kill``) ends a run through the same path as
a KeyboardInterrupt, so the checkpoint is kept, a start without one is cleaned up and the CLI says how to resume."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """A KeyboardInterrupt raised by a termination signal; ``signum`` gives the CLI its exit status (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt); the previous handler is restored
    after. Signal handlers can only be set in the main thread: elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["Terminated", "terminate_as_interrupt"]

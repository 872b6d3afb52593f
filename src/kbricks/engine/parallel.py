"""Independent runs in parallel single-threaded worker processes (the seeds of a sweep, the studies of a reproduction).

Why processes and not threads: the networks kbricks trains on CPU are small, so a second intra-op thread gains
little while one descheduled thread stalls every parallel operation (with one busy neighbour on a 2-core machine a
2-thread step was 2.4-13x slower than a 1-thread step). Independent runs share nothing, so W single-threaded
processes keep W cores busy and degrade gracefully when the machine is shared. ``KBRICKS_THREADS`` set by the user
is passed on unchanged; otherwise each worker gets ``cores // workers`` threads (1 on a 2-core machine).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

Call = Tuple[Callable[..., Any], tuple, dict]

_launcher: Optional[Any] = None  # a cluster launcher (engine/launch.py) chosen by the CLI for this process


@contextmanager
def launching(launcher: Optional[Any]) -> Iterator[None]:
    """Within the block, :func:`run_parallel` hands its calls to ``launcher`` (an object with ``map(calls)``, e.g.
    :class:`kbricks.engine.launch.SubmititLauncher`) instead of the local pool; ``None`` keeps the pool."""
    global _launcher
    saved, _launcher = _launcher, launcher
    try:
        yield
    finally:
        _launcher = saved


_serial = False  # True in a pool's worker and inside in_process(): no nested pools


@contextmanager
def in_process() -> Iterator[None]:
    """Within the block, :func:`run_parallel` runs every call here, in order (e.g. a reproduction run with one
    worker keeps its studies' sweeps in this process, with the caller's log)."""
    global _serial
    saved, _serial = _serial, True
    try:
        yield
    finally:
        _serial = saved


def default_workers(jobs: int) -> int:
    """1 inside a worker or :func:`in_process`; else ``KBRICKS_WORKERS`` if set, else one worker per core, never
    more than there are jobs."""
    if _serial:
        return 1
    env = os.environ.get("KBRICKS_WORKERS")
    n = int(env) if env else (os.cpu_count() or 1)
    return max(1, min(n, jobs))


def worker_threads(workers: int) -> int:
    env = os.environ.get("KBRICKS_THREADS")
    return max(1, int(env)) if env else max(1, (os.cpu_count() or 1) // workers)


def user_modules() -> List[str]:
    """Modules outside kbricks that registered models, datasets, scenarios or methods here (``--import``, a test
    file, a plugin): a fresh worker imports them too, so every name the parent knows resolves there."""
    from ..data import DATASETS, SCENARIOS
    from ..methods.base import METHODS
    from ..models import MODELS

    names = {getattr(obj, "__module__", None) for reg in (MODELS, DATASETS, SCENARIOS, METHODS) for obj in reg._entries.values()}
    return sorted(n for n in names if n and not n.startswith("kbricks") and n not in ("__main__", "__mp_main__"))


def _worker_settings(threads: int) -> None:
    global _serial
    import torch

    from ..core.seeding import use_default_threads

    use_default_threads(threads)  # every run the worker starts uses them (core.seeding.default_threads)
    _serial = True  # a sweep inside a worker runs its seeds in that worker: no nested pools
    torch.set_num_threads(threads)


def _in_worker(threads: int, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """One call in a reused worker: the pool's settings again first (a previous run may have set its own threads)."""
    _worker_settings(threads)
    return fn(*args, **kwargs)


def _init_worker(threads: int, path: List[str], modules: List[str]) -> None:
    import importlib
    import sys

    sys.path[:0] = [p for p in path if p not in sys.path]
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the run that needs it reports the unknown name
            pass
    _worker_settings(threads)  # after the imports: a plugin module may set its own thread count when imported


def timed(fn: Callable[..., Any], *args, **kwargs) -> Tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process) of one call."""
    import time

    w0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - w0, time.process_time() - c0


_pool: Optional[ProcessPoolExecutor] = None
_pool_key: Optional[tuple] = None


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, kept for the next call (a study runs several sweeps: starting
    Python and importing torch once per worker instead of once per sweep)."""
    import atexit
    import sys

    global _pool, _pool_key
    init = (worker_threads(workers), list(sys.path), user_modules())
    key = (workers, init[0], tuple(init[2]))
    if _pool is None or _pool_key != key or getattr(_pool, "_broken", False):
        if _pool is None:
            atexit.register(lambda: _pool is not None and _pool.shutdown(cancel_futures=True))
        else:
            _pool.shutdown(cancel_futures=True)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is already running
        _pool, _pool_key = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init), key
    return _pool


def run_parallel(calls: Sequence[Call], workers: Optional[int] = None) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` for every call, ``workers`` at a time in worker processes; results in call order.

    With one worker (or one call) everything runs here, in order. The first failure is raised here once the calls
    already running have finished; queued ones are cancelled. ``fn`` must be importable (a module-level function).
    Inside :func:`launching`, every call is a cluster job instead (``workers`` does not apply)."""
    if _launcher is not None:
        return _launcher.map(calls)
    workers = default_workers(len(calls)) if workers is None else max(1, min(workers, len(calls)))
    if workers == 1 or _serial:
        return [fn(*args, **kwargs) for fn, args, kwargs in calls]
    pool = worker_pool(workers)
    threads = _pool_key[1]
    futures = [pool.submit(_in_worker, threads, fn, *args, **kwargs) for fn, args, kwargs in calls]
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
    if failed:
        for f in pending:
            f.cancel()
        wait([f for f in pending if not f.cancelled()])
        raise failed[0].exception()
    return [f.result() for f in futures]

"""Where independent runs go: this machine's worker pool (the default) or a cluster, through submitit.

A study at the papers' scale is hundreds of GPU runs. ``SubmititLauncher`` sends each independent call of
:func:`kbricks.engine.parallel.run_parallel` (a seed of a sweep, a study of a reproduction) to Slurm as one job, and
waits for their results; with ``cluster="local"`` submitit runs the same jobs as local processes, which is how the
tests exercise it. A run that needs several GPUs runs inside its job under ``torchrun`` (:func:`torchrun_command`).

The launcher is chosen by the caller (``kbricks sweep|study|reproduce --launcher submitit ...``) and scoped with
:func:`kbricks.engine.parallel.launching`, so library code below the CLI passes nothing around.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..errors import ConfigError, KbricksError

Call = Tuple[Callable[..., Any], tuple, dict]
LAUNCHERS = ("pool", "submitit")


class LaunchError(KbricksError):
    """A job sent to a cluster failed; the message names the job and its log."""


@dataclass(frozen=True)
class ClusterOptions:
    """What each job asks the scheduler for. ``cluster``: None picks Slurm when ``sbatch`` is on the PATH, else
    local processes; "slurm", "local" or "debug" (in this process, for debugging) force one."""

    folder: Path = Path("runs/submitit")
    cluster: Optional[str] = None
    partition: Optional[str] = None
    gpus: int = 0
    cpus: int = 1
    time_min: int = 60
    mem_gb: Optional[float] = None
    name: str = "kbricks"

    def scheduler_parameters(self) -> dict:
        """submitit's parameters; the slurm_ ones are dropped by the local executor."""
        params = {"timeout_min": self.time_min, "cpus_per_task": self.cpus, "gpus_per_node": self.gpus,
                  "tasks_per_node": 1, "nodes": 1, "name": self.name}
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        return params


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher submitit needs the submitit package: pip install 'kbricks[cluster]'") from None
    return submitit


def _job(fn_name: Tuple[str, str], args: tuple, kwargs: dict, threads: int, path: List[str], modules: List[str]) -> Any:
    """What runs inside a job: this process's import path and plugin modules first (a plugin registered with
    --import must resolve there too), the job's thread count, then the call. The function travels by name, so
    unpickling the job needs only kbricks, and the function's module is imported once the path is set."""
    import importlib

    from .parallel import _init_worker

    _init_worker(threads, path, modules)
    fn: Any = importlib.import_module(fn_name[0])
    for part in fn_name[1].split("."):
        fn = getattr(fn, part)
    return fn(*args, **kwargs)


def _name_of(fn: Callable[..., Any]) -> Tuple[str, str]:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ConfigError(f"{getattr(fn, '__name__', fn)!r} cannot run as a cluster job: it must be a module-level "
                          "function of an importable module")
    return module, qualname


class SubmititLauncher:
    """Runs every call as one submitit job and returns their results in call order. The first failure is raised
    as one line naming the job and its log once every job has ended (finished jobs keep their run directories, so a
    rerun reuses them, as sweeps and studies do)."""

    def __init__(self, options: ClusterOptions):
        self.options = options
        submitit = _import_submitit()
        cluster = options.cluster
        if cluster is None:
            cluster = "slurm" if shutil.which("sbatch") else "local"
        if cluster not in ("slurm", "local", "debug"):
            raise ConfigError(f"--cluster {cluster!r}: expected slurm, local or debug")
        self.cluster = cluster
        self.executor = submitit.AutoExecutor(folder=str(options.folder), cluster=cluster)
        params = options.scheduler_parameters()
        if cluster != "slurm":
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        self.executor.update_parameters(**params)

    def map(self, calls: Sequence[Call]) -> List[Any]:
        from .parallel import user_modules

        if not calls:
            return []
        init = (max(1, self.options.cpus), list(sys.path), user_modules())
        jobs = [self.executor.submit(_job, _name_of(fn), args, kwargs, *init) for fn, args, kwargs in calls]
        results, failures = [], []
        for job in jobs:
            try:
                results.append(job.result())
            except Exception as exc:  # noqa: BLE001 - reported below with the job's log
                results.append(None)
                failures.append((job, exc))
        if failures:
            job, exc = failures[0]
            log = getattr(job.paths, "stderr", self.options.folder)
            raise LaunchError(f"{len(failures)} of {len(jobs)} job(s) failed; first: job {job.job_id}: "
                              f"{_last_error_line(exc)} (log: {log})")
        return results

    def describe(self) -> str:
        o = self.options
        where = f"partition {o.partition}" if o.partition else self.cluster
        return f"submitit ({where}, {o.gpus} GPU(s), {o.cpus} CPU(s), {o.time_min} min per job, logs in {o.folder})"


def _last_error_line(exc: BaseException) -> str:
    """submitit wraps a job's traceback in its message: the job's own error is the traceback's last
    ``SomeError: message`` line."""
    import re

    found = [ln.strip() for ln in str(exc).splitlines() if re.match(r"^\s*[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln)]
    if found:
        return found[-1]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def torchrun_command(nproc: int, argv: Sequence[str]) -> List[str]:
    """The command that runs ``kbricks <argv>`` under torchrun with ``nproc`` processes on this node (one per GPU
    of the job); torch's own launcher, so DDP inside a job is the same as DDP on a workstation."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "kbricks", *argv]


def run_command(argv: Sequence[str]) -> int:
    """Run a command inside a job; its exit status becomes the job's result (non-zero raises, so the job fails)."""
    import subprocess

    code = subprocess.call(list(argv))
    if code:
        raise LaunchError(f"{' '.join(argv[:6])} ... exited with status {code}")
    return code


LAUNCHER_OPTIONS = ("--launcher", "--cluster", "--partition", "--gpus", "--cpus", "--time", "--mem-gb", "--submitit-dir")


def without_launcher_options(argv: Sequence[str]) -> List[str]:
    """``argv`` less the launcher's own options (each takes a value), i.e. the command a job runs."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in LAUNCHER_OPTIONS:
            skip = True
        elif not word.startswith(tuple(o + "=" for o in LAUNCHER_OPTIONS)):
            out.append(word)
    return out


def submit_command(launcher: "SubmititLauncher", argv: Sequence[str]) -> int:
    """Run ``kbricks <argv>`` as one job (under torchrun with one process per GPU when the job has several) and wait
    for it; a failed job raises :class:`LaunchError` naming its log."""
    argv = without_launcher_options(argv)
    gpus = launcher.options.gpus
    command = torchrun_command(gpus, argv) if gpus > 1 else [sys.executable, "-m", "kbricks", *argv]
    print(f"kbricks: {launcher.describe()}: {' '.join(command)}", file=sys.stderr)
    return launcher.map([(run_command, (command,), {})])[0]


def add_launcher_arguments(parser) -> None:
    """The launcher options shared by train, sweep, study and reproduce."""
    g = parser.add_argument_group("launcher (where the runs go)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="pool",
                   help="pool: worker processes on this machine (default); submitit: one Slurm job per run")
    g.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="submitit's executor (default: slurm when sbatch is on the PATH, else local processes)")
    g.add_argument("--partition", default=None, help="Slurm partition")
    g.add_argument("--gpus", type=int, default=0, help="GPUs per job (a run with more than 1 runs under torchrun)")
    g.add_argument("--cpus", type=int, default=1, help="CPUs per job")
    g.add_argument("--time", dest="time_min", type=int, default=60, help="minutes per job")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per job")
    g.add_argument("--submitit-dir", default="runs/submitit", help="where submitit keeps job scripts and logs")


def launcher_from_args(args) -> Optional[SubmititLauncher]:
    """None for the local pool; a SubmititLauncher for --launcher submitit."""
    if getattr(args, "launcher", "pool") != "submitit":
        return None
    if args.gpus < 0 or args.cpus < 1 or args.time_min < 1:
        raise ConfigError("--gpus must be >= 0, --cpus and --time >= 1")
    return SubmititLauncher(ClusterOptions(folder=Path(args.submitit_dir), cluster=args.cluster, partition=args.partition,
                                           gpus=args.gpus, cpus=args.cpus, time_min=args.time_min, mem_gb=args.mem_gb))

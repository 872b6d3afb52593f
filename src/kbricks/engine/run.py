"""The life of one run, plain or continual: check the config, open and lock the run directory, build the experiment,
check and apply a resume, record config.yaml and env.json, fit (:class:`~kbricks.engine.trainer.Trainer` or
:class:`~kbricks.engine.continual.ContinualTrainer`; either writes the model card), release the directory, or mark
it abandoned when the start failed.

Resume rules: a checkpoint may only be continued with the same seed, data, model and method; a plain run may change
``optim.lr``, ``weight_decay`` and ``momentum`` (applied to the restored optimiser, and said so); a continual run
builds each task's optimiser afresh, so any optimiser change applies from the next task (and is said so). A plain
run may be given more ``train.epochs`` (it trains on), never fewer than it has already trained.

SIGTERM (a scheduler's stop, ``kill``) ends a run as Ctrl-C does: the last checkpoint is kept and the CLI prints how
to resume (exit status 143).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from ..config import RunConfig, parse_config
from ..core import dist
from ..core.checkpoint import load_checkpoint
from ..core.env import environment_info
from ..core.hooks import Hook
from ..core.rundir import RunDirectory
from ..core.seeding import pick_device, set_deterministic, set_threads
from ..core.signals import terminate_as_interrupt
from ..errors import CheckpointError, KbricksError
from .card import plugin_modules
from .continual import ContinualTrainer
from .experiment import build_experiment, validate
from .loop import Loop
from .trainer import Trainer

AnyTrainer = Union[Trainer, ContinualTrainer]


# ---- resume rules ------------------------------------------------------------------------------------------------


def resumable_state(ckpt_dir: Path, cfg: RunConfig) -> Optional[Dict[str, Any]]:
    """The run's ``last.pt`` if there is one, after checking it may be continued with ``cfg``."""
    path = Path(ckpt_dir) / "last.pt"
    if not path.exists():
        return None
    state = load_checkpoint(path)
    check_resumable(state, cfg)
    return state


def check_resumable(state: Dict[str, Any], cfg: RunConfig) -> None:
    """A checkpoint may only be continued with the same seed, data, model and method (training length and some
    optimiser settings may change)."""
    saved = state.get("config", {})
    try:  # through today's schema: a setting added since the checkpoint was written reads as its default
        saved = parse_config(saved).to_dict()
    except KbricksError:
        pass  # a setting that no longer exists: compared as written, so it shows as a difference
    now = cfg.to_dict()
    for key in ("seed", "data", "model", "method"):
        if saved.get(key) != now[key]:
            raise CheckpointError(f"cannot resume: the checkpoint was trained with a different '{key}' config "
                                  f"(start a new run, or resume with the original {key} settings)")
    done = state.get("epoch")
    if not cfg.is_continual and isinstance(done, int) and done > cfg.train.epochs:
        raise CheckpointError(f"cannot resume: the run has already trained {done} epochs, more than train.epochs={cfg.train.epochs}; "
                              f"resume with train.epochs >= {done} (or start a new run)")


OPTIM_CHANGEABLE_ON_RESUME = ("lr", "weight_decay", "momentum")


def check_optim_resumable(saved: Dict[str, Any], cfg: RunConfig) -> None:
    """Only ``optim.lr``, ``weight_decay`` and ``momentum`` may change on resume (they are applied to the restored
    optimiser); another change (optimiser, schedule, milestones...) cannot be applied to its state and is refused."""
    now = cfg.optim.model_dump(mode="json")
    fixed = [k for k in now if k not in OPTIM_CHANGEABLE_ON_RESUME and k in saved and saved[k] != now[k]]
    if fixed:
        raise CheckpointError(f"cannot resume: optim.{fixed[0]} changed from {saved[fixed[0]]!r} to {now[fixed[0]]!r}; "
                              f"only optim.{', optim.'.join(OPTIM_CHANGEABLE_ON_RESUME)} can change on resume")


def apply_optim_overrides(loop: Loop, saved: Dict[str, Any], cfg: RunConfig) -> None:
    """On resume the optimiser state comes from the checkpoint; a changed ``optim.lr``, ``weight_decay`` or
    ``momentum`` is applied to it explicitly (and said so), never silently ignored. Other optimiser changes are
    refused."""
    check_optim_resumable(saved, cfg)
    o, now = cfg.optim, cfg.optim.model_dump(mode="json")
    changed = [k for k in OPTIM_CHANGEABLE_ON_RESUME if k in saved and saved[k] != now[k]]
    for key in changed:
        if key == "lr":
            loop.set_base_lr(o.lr * (dist.world_size() if o.scale_lr_with_world_size else 1))
        else:
            for g in loop.optimizer.param_groups:
                if key in g:
                    g[key] = now[key]
    announce_optim_changes(saved, now, changed, "applied to the restored optimiser")


def announce_optim_changes(saved: Dict[str, Any], now: Dict[str, Any], changed: Sequence[str], how: str) -> None:
    """One stderr line (rank 0) naming the optimiser settings a resume changed and how they take effect."""
    if changed and dist.is_main_process():
        text = ", ".join(f"optim.{k} {saved[k]} -> {now[k]}" for k in changed)
        print(f"kbricks: resuming with {text} ({how})", file=sys.stderr)


def resume(trainer: AnyTrainer, cfg: RunConfig) -> None:
    """Continue ``trainer`` from its run's ``last.pt`` (nothing to do without one), under the resume rules."""
    state = resumable_state(trainer.ckpt_dir, cfg)
    if state is None:
        return
    saved = state.get("config", {}).get("optim", {})
    if isinstance(trainer, ContinualTrainer):
        now = cfg.optim.model_dump(mode="json")
        changed = [k for k in sorted(now) if k in saved and saved[k] != now[k]]
        announce_optim_changes(saved, now, changed, f"applies to the tasks still to learn, from task {state['next_task'] + 1}")
        trainer.restore(state)
    else:
        trainer.restore(state)
        apply_optim_overrides(trainer.loop, saved, cfg)


# ---- the lifecycle -----------------------------------------------------------------------------------------------


def open_run(cfg: RunConfig, run_dir: Optional[Path], resume: bool, overwrite: bool = False) -> RunDirectory:
    """Rank 0 checks and locks the run directory (refusing before anything is written); every rank gets its path."""
    path: Optional[str] = None
    run: Optional[RunDirectory] = None
    if dist.is_main_process():
        run = RunDirectory.open(Path(run_dir) if run_dir else None, cfg.out_dir, cfg.name, cfg.seed, resume, overwrite)
        path = str(run.path)
        if run_dir is None and cfg.train.progress != "off":
            print(f"kbricks: run directory {path}", file=sys.stderr, flush=True)
    path = dist.broadcast_object(path)
    return run if run is not None else RunDirectory(Path(path), created=False)


def start_run(cfg: RunConfig, run_dir: Optional[Path], resume: bool, overwrite: bool) -> RunDirectory:
    """Everything before training that can fail without touching the disk happens first; a ``resume`` is checked
    against the checkpoint's config before anything is written."""
    validate(cfg)
    device = pick_device(cfg.train.device)
    set_threads(cfg.train.num_threads)
    set_deterministic(cfg.train.deterministic)
    dist.init_from_env(device, cfg.train.ddp_timeout_s)
    run = open_run(cfg, run_dir, resume, overwrite)
    if resume and dist.is_main_process() and run.has_checkpoint():
        try:
            state = load_checkpoint(run.ckpt_dir / "last.pt")
            check_resumable(state, cfg)
            if not cfg.is_continual:  # continual stages take their optimiser settings afresh for each task
                check_optim_resumable(state.get("config", {}).get("optim", {}), cfg)
        except BaseException:
            run.release()
            raise
    return run


def execute_run(cfg: RunConfig, run_dir: Optional[Path], resume_run: bool, hooks: Optional[List[Hook]], overwrite: bool,
                **fit_kwargs: Any) -> Dict[str, Any]:
    """The life of one run, plain or continual: open (and lock) the run directory, build the experiment, check a
    resume before anything is written, record config.yaml and env.json, fit; a failed start is marked abandoned.
    SIGTERM stops it as Ctrl-C does."""
    with terminate_as_interrupt():
        return _execute_run(cfg, run_dir, resume_run, hooks, overwrite, **fit_kwargs)


def _execute_run(cfg: RunConfig, run_dir: Optional[Path], resume_run: bool, hooks: Optional[List[Hook]], overwrite: bool,
                 **fit_kwargs: Any) -> Dict[str, Any]:
    run = start_run(cfg, run_dir, resume_run, overwrite)
    try:
        exp = build_experiment(cfg)
        trainer: AnyTrainer = (ContinualTrainer if cfg.is_continual else Trainer)(exp, run, hooks)
        if resume_run:
            resume(trainer, cfg)  # refusals happen here, before config.yaml records the new config
        if dist.is_main_process():
            run.write_text("config.yaml", config_yaml(cfg))
            run.write_json("env.json", {**environment_info(exp.device, dist.world_size()), "imports": plugin_modules(cfg)})
        summary = trainer.fit(**fit_kwargs)
    except BaseException:
        if dist.is_main_process():
            run.abandon()
        raise
    run.release()
    summary["run_dir"] = str(run.path)
    return summary


def run_training(cfg: RunConfig, run_dir: Optional[Path] = None, resume: bool = False, hooks: Optional[List[Hook]] = None,
                 overwrite: bool = False) -> Dict[str, Any]:
    """Build everything from ``cfg`` and train; returns the summary (also in ``run_dir/results.json``). Continual
    configs (``data.scenario``) run the task loop of ``engine.continual``. Under DDP, a rank that stops makes the
    others fail with one line (after at most ``train.ddp_timeout_s``) instead of a backend traceback."""
    try:
        return execute_run(cfg, run_dir, resume, hooks, overwrite)
    except RuntimeError as exc:
        if dist.is_peer_failure(exc):
            raise dist.peer_failure_error(exc, cfg.train.ddp_timeout_s) from None
        raise


def run_continual(cfg: RunConfig, run_dir: Optional[Path] = None, resume: bool = False, hooks: Optional[List[Hook]] = None,
                  overwrite: bool = False, stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Learn the scenario's tasks in order; returns the results (also in ``run_dir/results.json``). ``stop_after``:
    stop once that many tasks are learned (the run stays resumable)."""
    if not cfg.is_continual:
        raise KbricksError(f"run_continual needs a continual config (data.scenario); {cfg.name!r} has none: use run_training")
    return execute_run(cfg, run_dir, resume, hooks, overwrite, stop_after=stop_after)


def config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

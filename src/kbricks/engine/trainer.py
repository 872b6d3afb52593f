"""The training loop: one readable epoch/step loop (:class:`Loop`), and a training run around it (:class:`Trainer`):
run directory, hooks for logging, atomic checkpoints, exact resume, NaN stop, export.

Randomness is re-derived from (seed, epoch, rank) at the start of every epoch, so a run resumed from the
checkpoint of epoch e replays epochs e+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..config import OptimConfig, RunConfig, TrainConfig, parse_config
from ..core import dist
from ..core.checkpoint import fingerprint, load_checkpoint, load_state_into, save_checkpoint, save_safetensors
from ..core.env import environment_info
from ..core.hooks import CsvSummary, Hook, JsonlLogger, PlotCurves, ProgressBar, read_jsonl
from ..core.metrics import evaluate
from ..core.rundir import RunDirectory
from ..core.seeding import derive_seed, generator, pick_device, set_deterministic, set_threads
from ..data import ArrayDataset, BatchAugment
from ..errors import CheckpointError, ConfigError, DataError, KbricksError, TrainingDiverged
from ..methods.base import Batch
from ..models import count_parameters
from .experiment import Experiment, build_experiment, validate

FUSED_OPTIMIZERS = ("sgd", "adam", "adamw")
IMPLEMENTATION_KEYS = ("fused", "foreach")  # how the update runs, not optimiser state


def fused_supported(params: Sequence[nn.Parameter]) -> bool:
    """torch's fused update (one kernel for every parameter) needs floating-point parameters on one device type
    that has it; for many small tensors (KF's task networks) it is far cheaper than the per-parameter loop
    (`make bench`: SGD update over KF's 184 digits tensors)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= set(_get_fused_kernels_supported_devices())
            and all(p.is_floating_point() and not p.is_sparse for p in params))


def make_optimizer(o: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    lr = o.lr * (dist.world_size() if o.scale_lr_with_world_size else 1)
    params = list(params)
    if not params:
        raise ConfigError("the method has no trainable parameters")
    fused = {"fused": True} if o.name in FUSED_OPTIMIZERS and fused_supported(params) else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, **fused)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=o.weight_decay, **fused)


def make_scheduler(o: OptimConfig, opt: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
    total, warmup = epochs * steps_per_epoch, o.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if o.schedule == "step":
            epoch = step // steps_per_epoch
            return o.gamma ** sum(epoch >= m for m in o.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Loop:
    """Epochs of seeded, shuffled mini-batches over one dataset: the module's named losses, backward, step.

    ``module.training_step(batch)`` (through ``forward``, for DDP) returns ``{"loss": ..., other terms}``.
    ``seed_key`` names the loop (the run seed, plus the task and stage for continual runs): the data order,
    augmentation and any sampling inside the module are functions of (seed_key, epoch, rank) only.
    """

    def __init__(self, module: nn.Module, parameters: Sequence[nn.Parameter], data: ArrayDataset, transform: BatchAugment,
                 optim: OptimConfig, train: TrainConfig, epochs: int, device: torch.device, seed_key: Sequence[int],
                 on_step: Optional[Callable[[int, Dict[str, float]], None]] = None, where: str = ""):
        self.module, self.data, self.transform, self.train_cfg = module, data, transform, train
        self.device, self.seed_key, self.on_step, self.where = device, tuple(seed_key), on_step, where
        self.parameters = list(parameters)
        if train.channels_last:
            module.to(memory_format=torch.channels_last)
        self.model = dist.wrap_ddp(module, device, sync_batchnorm=train.sync_batchnorm)
        self.forward = compiled_or_eager(self.model) if train.compile else self.model
        self.autocast = autocast_dtype(train.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" and device.type == "cuda" else None
        self.source_x = pinned(data.x, device)  # page-locked host memory: asynchronous copies to the GPU
        world = dist.world_size()
        self.batch_size = train.batch_size
        self.global_batch = train.batch_size * world
        n = len(data)
        if n < self.global_batch:
            raise DataError(f"training set has {n} samples, fewer than one batch (train.batch_size={train.batch_size} x {world} processes)")
        self.steps_per_epoch = n // self.global_batch
        if train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, train.max_steps_per_epoch)
        self.epochs = epochs
        self.optimizer = make_optimizer(optim, self.parameters)
        self.scheduler = make_scheduler(optim, self.optimizer, epochs, self.steps_per_epoch)

    def state_dict(self) -> Dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        built = [{k: g.get(k) for k in IMPLEMENTATION_KEYS} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for g, impl in zip(self.optimizer.param_groups, built):  # a checkpoint's groups carry the update's
            g.update(impl)  # implementation too: keep today's (the state itself is the same either way)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_base_lr(self, lr: float) -> None:
        """Change the base learning rate mid-run (resume with a new ``optim.lr``), keeping the schedule's position."""
        sched = self.scheduler
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for g, fn in zip(self.optimizer.param_groups, sched.lr_lambdas):
            g["initial_lr"] = lr
            g["lr"] = lr * fn(sched.last_epoch)

    def run_epoch(self, epoch: int) -> Dict[str, float]:
        """One epoch; returns the mean of every named loss term (``train/<name>``), averaged over ranks."""
        rank, bs, data = dist.rank(), self.batch_size, self.data
        shuffle = generator(derive_seed(*self.seed_key, epoch))  # same permutation on every rank
        aug = generator(derive_seed(*self.seed_key, epoch, rank, 1))
        torch.manual_seed(derive_seed(*self.seed_key, epoch, rank, 2))  # dropout, sampling inside methods
        perm = torch.randperm(len(data), generator=shuffle)
        self.model.train()
        sums: Dict[str, torch.Tensor] = {}
        for step in range(self.steps_per_epoch):
            start = step * self.global_batch + rank * bs
            idx = perm[start:start + bs]
            raw = self.source_x[idx].to(self.device, non_blocking=True)
            x = self.transform(raw, train=True, generator=aug)
            if self.train_cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = Batch(
                x=x,
                y=data.y[idx].to(self.device),
                latents=data.latents[idx].to(self.device) if data.latents is not None else None,
                index=idx,
                raw=raw,
            )
            with torch.autocast(self.device.type, self.autocast or torch.float32, enabled=self.autocast is not None):
                losses = self.forward(batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                exc = TrainingDiverged(self._diverged_message(loss, losses, batch, epoch, step))
                exc.bad_input = not torch.isfinite(batch.raw).all().item()
                raise exc
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:  # fp16: scaled loss, unscaled gradients for clipping, skipped steps on overflow
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.train_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.train_cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            if self.on_step is not None:
                self.on_step(step, {"loss": loss.item()})
        keys = sorted(sums)
        means = dist.all_reduce_mean(torch.stack([sums[k] for k in keys]) / self.steps_per_epoch)
        return {f"train/{k}": v for k, v in zip(keys, means.tolist())}

    def _diverged_message(self, loss, losses, batch: Batch, epoch: int, step: int) -> str:
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        head = f"loss became {loss.item()} {self.where}at epoch {epoch + 1}, step {step + 1} ({terms})"
        if not torch.isfinite(batch.raw).all():
            return f"{head}: the input batch itself holds NaN or inf values; clean the data"
        return f"{head}. Lower optim.lr or set train.grad_clip"


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.precision`` (None: full precision)."""
    if precision == "fp32":
        return None
    if device.type == "mps" and precision == "bf16":
        raise ConfigError("train.precision=bf16 is not supported on MPS; use fp16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def pinned(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` in page-locked memory when batches go from host memory to a CUDA device (else ``x`` itself)."""
    if device.type != "cuda" or x.device.type != "cpu" or x.is_pinned():
        return x
    try:
        return x.pin_memory()
    except RuntimeError:  # not enough page-locked memory: ordinary copies still work
        return x


def compiled_or_eager(module: nn.Module) -> Callable:
    """``torch.compile(module)``, falling back to the eager module (once, with a warning) when compiling fails:
    no C++ compiler, an unsupported operation in a user's method, an old platform."""
    import sys

    state: Dict[str, Any] = {"fn": None}

    def call(*args, **kwargs):
        if state["fn"] is None:
            try:
                state["fn"] = torch.compile(module)
                return state["fn"](*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                print(f"kbricks: warning: train.compile: torch.compile failed ({type(exc).__name__}: {first}); training eagerly",
                      file=sys.stderr)
                state["fn"] = module
        return state["fn"](*args, **kwargs)

    return call


class Trainer:
    """One training run of ``exp`` into ``run`` (a :class:`RunDirectory`): epochs, evaluation, checkpoints, export."""

    def __init__(self, exp: Experiment, run: RunDirectory, hooks: Optional[List[Hook]] = None):
        self.exp, self.cfg, self.run = exp, exp.cfg, run
        self.run_dir, self.ckpt_dir = run.path, run.ckpt_dir
        self.method = exp.method
        self.loop = Loop(self.method, list(self.method.trainable_parameters()), exp.data.train, exp.transform, self.cfg.optim,
                         self.cfg.train, self.cfg.train.epochs, exp.device, (self.cfg.seed,), self._on_step)
        self.steps_per_epoch, self.epochs, self.label = self.loop.steps_per_epoch, self.cfg.train.epochs, ""
        self.start_epoch, self.best, self.best_epoch = 0, -1.0, 0
        self.card: Dict[str, Any] = {}
        self.hooks: List[Hook] = []
        if dist.is_main_process():
            metrics = self.run_dir / "metrics.jsonl"
            self.hooks = [JsonlLogger(metrics), CsvSummary(self.run_dir / "summary.csv", metrics), ProgressBar(self.cfg.train.progress)]
            if self.cfg.train.plots:
                self.hooks.append(PlotCurves(metrics, self.run_dir / "plots"))
            self.hooks += self.method.hooks()
        self.hooks += list(hooks or [])

    # ---- checkpoints -------------------------------------------------------------------------------
    def state(self, epoch: int) -> Dict[str, Any]:
        return {"model": self.method.state_dict(), **self.loop.state_dict(), "epoch": epoch, "best": self.best,
                "best_epoch": self.best_epoch, "config": self.cfg.to_dict()}

    def resume(self) -> None:
        state = resumable_state(self.ckpt_dir, self.cfg)
        if state is None:
            return
        load_state_into(self.method, state["model"], "method")
        self.loop.load_state_dict(state)
        apply_optim_overrides(self.loop, state.get("config", {}).get("optim", {}), self.cfg)
        self.start_epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]

    def checkpoint_note(self, bad_input: bool = False) -> str:
        last = self.ckpt_dir / "last.pt"
        if not last.exists():
            return "no checkpoint was written yet (nothing to resume)"
        epoch = load_checkpoint(last).get("epoch")
        if bad_input:
            return f"the last good checkpoint (epoch {epoch}) is {last}"
        return f"the last good checkpoint (epoch {epoch}) is {last}: resume it with --resume -o optim.lr=<lower>"

    def keep_row(self, row: Dict[str, Any]) -> bool:
        return row.get("epoch", 0) <= self.start_epoch

    def _hook(self, name: str, *args) -> None:
        for h in self.hooks:
            getattr(h, name)(self, *args)

    def _on_step(self, step: int, losses: Dict[str, float]) -> None:
        self._hook("on_step_end", step, losses)

    # ---- the run -----------------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, float]:
        exp = self.exp
        m = evaluate(self.method, exp.data.test, exp.tasks, exp.transform, exp.device, self.cfg.train.eval_batch_size)
        return {f"test/{k}": v for k, v in m.items()}

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        if resume:
            self.resume()
        self._hook("on_fit_start")
        t0 = time.time()
        last_metrics: Dict[str, Any] = {}
        train = self.cfg.train
        for epoch in range(self.start_epoch, train.epochs):
            self._hook("on_epoch_start", epoch)
            te = time.time()
            metrics: Dict[str, Any] = {"epoch": epoch + 1, "lr": self.loop.lr}
            try:
                metrics.update(self.loop.run_epoch(epoch))
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"{exc}; {self.checkpoint_note(getattr(exc, 'bad_input', False))}") from None
            metrics["lr"] = self.loop.scheduler.get_last_lr()[0]
            done = epoch + 1
            if done == train.epochs or (train.eval_every and done % train.eval_every == 0):
                metrics.update(self.evaluate())
                if metrics["test/acc"] > self.best:
                    self.best, self.best_epoch = metrics["test/acc"], done
                    if dist.is_main_process():
                        save_checkpoint({"model": self.method.state_dict(), "epoch": done, "config": self.cfg.to_dict()}, self.ckpt_dir / "best.pt")
            metrics["time_s"] = time.time() - te
            self._hook("on_epoch_end", done, metrics)
            if dist.is_main_process() and (done % train.checkpoint_every == 0 or done == train.epochs):
                save_checkpoint(self.state(done), self.ckpt_dir / "last.pt")
            dist.barrier()
            last_metrics = metrics
        if not last_metrics:  # already complete: report the stored final epoch
            rows = read_jsonl(self.run_dir / "metrics.jsonl")
            last_metrics = rows[-1] if rows else self.evaluate()
        summary = self.summarize(last_metrics, time.time() - t0)
        if dist.is_main_process():
            self.export(summary)
        self._hook("on_fit_end", summary)
        dist.barrier()
        return summary

    def summarize(self, last: Dict[str, Any], seconds: float) -> Dict[str, Any]:
        return {
            "name": self.cfg.name,
            "seed": self.cfg.seed,
            "epochs": self.cfg.train.epochs,
            "final": {k: v for k, v in last.items() if k.startswith("test/")},
            "best": {"test/acc": self.best, "epoch": self.best_epoch},
            "params": count_parameters(self.method.export_module()),
            "train_seconds_this_session": round(seconds, 2),
            "world_size": dist.world_size(),
        }

    def export(self, summary: Dict[str, Any]) -> None:
        """Shareable weights (safetensors) + a JSON card that says how to rebuild and what they scored."""
        net = self.method.export_module()
        tensors = net.state_dict()
        save_safetensors(tensors, self.run_dir / "model.safetensors", {"format": "kbricks-model-v1"})
        train = self.exp.data.train
        self.card = {
            "model": self.cfg.model.model_dump(),
            "method": self.cfg.method.name,
            "network": network_kind(net),
            "data": self.cfg.data.name,
            "num_classes": train.num_classes,
            "classes": train.classes,
            "in_channels": train.in_channels,
            "image_size": train.image_size,
            "normalize": {"mean": self.exp.transform.mean, "std": self.exp.transform.std},
            "tasks": [t.to_dict() for t in self.exp.tasks],
            "fingerprint": fingerprint(tensors),
            "metrics": summary,
        }
        self.run.write_json("model.json", self.card)
        self.run.write_json("results.json", summary)


def network_kind(net: nn.Module) -> str:
    """What model.safetensors rebuilds: ``classifier`` (one network over the data's classes or task heads) or
    ``factors`` (KF factor networks: load the bricks instead)."""
    from ..models.factorized import FactorNetworks

    return "factors" if isinstance(net, FactorNetworks) else "classifier"


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
        import sys

        text = ", ".join(f"optim.{k} {saved[k]} -> {now[k]}" for k in changed)
        print(f"kbricks: resuming with {text} ({how})", file=sys.stderr)


def open_run(cfg: RunConfig, run_dir: Optional[Path], resume: bool, overwrite: bool = False) -> RunDirectory:
    """Rank 0 checks and locks the run directory (refusing before anything is written); every rank gets its path."""
    path: Optional[str] = None
    run: Optional[RunDirectory] = None
    if dist.is_main_process():
        run = RunDirectory.open(Path(run_dir) if run_dir else None, cfg.out_dir, cfg.name, cfg.seed, resume, overwrite)
        path = str(run.path)
        if run_dir is None and cfg.train.progress != "off":
            import sys

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


def run_training(cfg: RunConfig, run_dir: Optional[Path] = None, resume: bool = False, hooks: Optional[List[Hook]] = None,
                 overwrite: bool = False) -> Dict[str, Any]:
    """Build everything from ``cfg`` and train; returns the summary (also in ``run_dir/results.json``). Continual
    configs (``data.scenario``) run the task loop of ``engine.continual``. Under DDP, a rank that stops makes the
    others fail with one line (after at most ``train.ddp_timeout_s``) instead of a backend traceback."""
    try:
        if cfg.is_continual:
            from .continual import run_continual

            return run_continual(cfg, run_dir, resume=resume, hooks=hooks, overwrite=overwrite)
        return execute_run(cfg, run_dir, resume, hooks, overwrite, Trainer)
    except RuntimeError as exc:
        if dist.is_peer_failure(exc):
            raise dist.peer_failure_error(exc, cfg.train.ddp_timeout_s) from None
        raise


def execute_run(cfg: RunConfig, run_dir: Optional[Path], resume: bool, hooks: Optional[List[Hook]], overwrite: bool,
                trainer_cls: Callable[..., Any], **fit_kwargs: Any) -> Dict[str, Any]:
    """The life of one run, plain or continual: open (and lock) the run directory, build the experiment, check a
    resume before anything is written, record config.yaml and env.json, fit; a failed start is marked abandoned."""
    run = start_run(cfg, run_dir, resume, overwrite)
    try:
        exp = build_experiment(cfg)
        trainer = trainer_cls(exp, run, hooks)
        if resume:
            trainer.resume()  # refusals happen here, before config.yaml records the new config
        if dist.is_main_process():
            run.write_text("config.yaml", config_yaml(cfg))
            run.write_json("env.json", environment_info(exp.device, dist.world_size()))
        summary = trainer.fit(**fit_kwargs)
    except BaseException:
        if dist.is_main_process():
            run.abandon()
        raise
    run.release()
    summary["run_dir"] = str(run.path)
    return summary


def config_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

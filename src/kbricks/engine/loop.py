"""One optimisation loop (:class:`Loop`): epochs of seeded, shuffled mini-batches over one dataset, and the optimiser
and schedule it steps. Plain runs (:mod:`.trainer`) and continual runs (:mod:`.continual`) both train with it.

Randomness is re-derived from (seed key, epoch) at the start of every epoch, so a run resumed from the checkpoint of
epoch e replays epochs e+1.. exactly as an uninterrupted run would. The data order and the augmentation are the same
for N DDP ranks as for one process with the global batch (each rank augments the whole global batch with the one
stream and keeps its slice); only randomness inside the module (dropout, sampling) is drawn per rank.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from ..config import OptimConfig, TrainConfig
from ..core import dist
from ..core.seeding import derive_seed, generator
from ..data import ArrayDataset, BatchAugment
from ..errors import ConfigError, DataError, TrainingDiverged
from ..methods.base import Batch

FUSED_OPTIMIZERS = ("sgd", "adam", "adamw")
IMPLEMENTATION_KEYS = ("fused", "foreach")  # how the update runs, not optimiser state


def fused_devices() -> frozenset:
    """Device types with torch's fused optimiser kernels. torch lists them only through a private helper; when a
    torch version moves it, CUDA (which has had them since torch 2.0) is assumed."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError, TypeError):
        return FALLBACK_FUSED_DEVICES


FALLBACK_FUSED_DEVICES = frozenset({"cuda"})


def fused_supported(params: Sequence[nn.Parameter]) -> bool:
    """torch's fused update (one kernel for every parameter) needs floating-point parameters on one device type
    that has it; for many small tensors (KF's task networks) it is far cheaper than the per-parameter loop
    (`make bench`: SGD update over KF's 184 digits tensors)."""
    kinds = {p.device.type for p in params}
    return (len(kinds) == 1 and kinds <= fused_devices()
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
        # one augmentation stream for the global batch (rank 0's seed: a single process's): every rank augments the
        # whole global batch as one process would and keeps its own slice, so N ranks see the samples 1 process sees
        aug = generator(derive_seed(*self.seed_key, epoch, 0, 1))
        torch.manual_seed(derive_seed(*self.seed_key, epoch, rank, 2))  # dropout, sampling inside methods
        perm = torch.randperm(len(data), generator=shuffle)
        self.model.train()
        sums: Dict[str, torch.Tensor] = {}
        mine = slice(rank * bs, (rank + 1) * bs)
        for step in range(self.steps_per_epoch):
            whole = perm[step * self.global_batch:(step + 1) * self.global_batch]
            idx = whole[mine]
            raw = self.source_x[idx].to(self.device, non_blocking=True)
            if self.global_batch == bs:  # one process: the batch is the global batch
                x = self.transform(raw, train=True, generator=aug)
            else:
                x = self.transform(self.source_x[whole].to(self.device, non_blocking=True), train=True, generator=aug)[mine]
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

"""The training loop: one readable epoch/step loop, hooks for logging, atomic checkpoints, exact resume.

Randomness is re-derived from (seed, epoch, rank) at the start of every epoch, so a run resumed from the
checkpoint of epoch e replays epochs e+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import dist
from .checkpoint import fingerprint, load_checkpoint, load_state_into, save_checkpoint, save_safetensors
from .config import DataConfig, RunConfig, save_config
from .data import ArrayDataset, BatchAugment, DataSplits, Task, build_tasks, channel_stats, load_dataset
from .errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from .hooks import CsvSummary, Hook, JsonlLogger, PlotCurves, ProgressBar, read_jsonl
from .methods import Batch, Method, MethodContext, create_method
from .metrics import evaluate
from .models import count_parameters
from .utils import derive_seed, environment_info, generator, pick_device, seed_everything, set_deterministic


@dataclass
class Experiment:
    cfg: RunConfig
    data: DataSplits
    tasks: List[Task]
    method: Method
    transform: BatchAugment
    device: torch.device


def load_data(data: DataConfig) -> DataSplits:
    kwargs = dict(data.kwargs)
    if data.root is not None:
        kwargs["root"] = data.root
    splits = load_dataset(data.name, **kwargs)
    if data.train_subset is not None:
        splits.train = splits.train.subset(torch.arange(min(data.train_subset, len(splits.train))))
    return splits


def build_transform(data: DataConfig, train: ArrayDataset) -> BatchAugment:
    mean = std = None
    if data.augment.normalize:
        mean, std = channel_stats(train.x)
    return BatchAugment(data.augment.crop_padding, data.augment.hflip, mean, std)


def build_experiment(cfg: RunConfig, device: Optional[torch.device] = None) -> Experiment:
    device = device or pick_device(cfg.train.device)
    seed_everything(cfg.seed)  # model initialisation is a function of the seed only
    data = load_data(cfg.data)
    tasks = build_tasks(cfg.data.tasks, data.train)
    transform = build_transform(cfg.data, data.train)
    method = create_method(MethodContext(cfg, data.train, tasks, device, transform)).to(device)
    return Experiment(cfg, data, tasks, method, transform, device)


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = o.lr * (dist.world_size() if o.scale_lr_with_world_size else 1)
    params = list(params)
    if not params:
        raise ConfigError("the method has no trainable parameters")
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=o.weight_decay)


def make_scheduler(cfg: RunConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    o, total = cfg.optim, cfg.train.epochs * steps_per_epoch
    warmup = o.warmup_epochs * steps_per_epoch

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


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_dir) / cfg.name / f"{stamp}-seed{cfg.seed}"


class Trainer:
    def __init__(self, exp: Experiment, run_dir: Path, hooks: Optional[List[Hook]] = None):
        self.exp, self.cfg, self.run_dir = exp, exp.cfg, Path(run_dir)
        self.ckpt_dir = self.run_dir / "ckpt"
        self.method = exp.method
        self.model = dist.wrap_ddp(self.method, exp.device)
        world = dist.world_size()
        self.global_batch = self.cfg.train.batch_size * world
        n = len(exp.data.train)
        if n < self.global_batch:
            raise DataError(
                f"training set has {n} samples, fewer than one batch (train.batch_size={self.cfg.train.batch_size} x {world} processes)"
            )
        self.steps_per_epoch = n // self.global_batch
        if self.cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.cfg.train.max_steps_per_epoch)
        self.optimizer = make_optimizer(self.cfg, self.method.trainable_parameters())
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.steps_per_epoch)
        self.start_epoch, self.best, self.best_epoch = 0, -1.0, 0
        self.hooks: List[Hook] = []
        if dist.is_main_process():
            metrics = self.run_dir / "metrics.jsonl"
            self.hooks = [JsonlLogger(metrics), CsvSummary(self.run_dir / "summary.csv", metrics), ProgressBar(self.cfg.train.progress)]
            if self.cfg.train.plots:
                self.hooks.append(PlotCurves(metrics, self.run_dir / "plots"))
        self.hooks += list(hooks or [])

    # ---- checkpoints -------------------------------------------------------------------------------
    def state(self, epoch: int) -> Dict[str, Any]:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "config": self.cfg.to_dict(),
        }

    def resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        if not path.exists():
            return
        state = load_checkpoint(path)
        saved = state.get("config", {})
        for key in ("data", "model", "method"):
            if saved.get(key) != self.cfg.to_dict()[key]:
                raise CheckpointError(f"cannot resume: the checkpoint was trained with a different '{key}' config")
        load_state_into(self.method, state["model"], "method")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]

    def _hook(self, name: str, *args) -> None:
        for h in self.hooks:
            getattr(h, name)(self, *args)

    # ---- the loop ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, exp = self.cfg, self.exp
        rank, bs = dist.rank(), cfg.train.batch_size
        shuffle = generator(derive_seed(cfg.seed, epoch))  # same permutation on every rank
        aug = generator(derive_seed(cfg.seed, epoch, rank, 1))
        torch.manual_seed(derive_seed(cfg.seed, epoch, rank, 2))  # dropout, sampling inside methods
        perm = torch.randperm(len(exp.data.train), generator=shuffle)
        train = exp.data.train
        self.model.train()
        sums: Dict[str, torch.Tensor] = {}
        for step in range(self.steps_per_epoch):
            start = step * self.global_batch + rank * bs
            idx = perm[start:start + bs]
            raw = train.x[idx].to(exp.device)
            batch = Batch(
                x=exp.transform(raw, train=True, generator=aug),
                y=train.y[idx].to(exp.device),
                latents=train.latents[idx].to(exp.device) if train.latents is not None else None,
                index=idx,
                raw=raw,
            )
            losses = self.model(batch)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} ({terms}); "
                    f"the last good checkpoint is kept in {self.ckpt_dir}. Lower optim.lr or set train.grad_clip."
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(self.method.trainable_parameters()), cfg.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            self._hook("on_step_end", step, {"loss": loss.item()})
        keys = sorted(sums)
        means = dist.all_reduce_mean(torch.stack([sums[k] for k in keys]) / self.steps_per_epoch)
        return {f"train/{k}": v for k, v in zip(keys, means.tolist())}

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
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            self._hook("on_epoch_start", epoch)
            te = time.time()
            metrics: Dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            metrics.update(self.train_epoch(epoch))
            metrics["lr"] = self.scheduler.get_last_lr()[0]
            done = epoch + 1
            if done % self.cfg.train.eval_every == 0 or done == self.cfg.train.epochs:
                metrics.update(self.evaluate())
                if metrics["test/acc"] > self.best:
                    self.best, self.best_epoch = metrics["test/acc"], done
                    if dist.is_main_process():
                        save_checkpoint({"model": self.method.state_dict(), "epoch": done, "config": self.cfg.to_dict()}, self.ckpt_dir / "best.pt")
            metrics["time_s"] = time.time() - te
            self._hook("on_epoch_end", done, metrics)
            if dist.is_main_process() and (done % self.cfg.train.checkpoint_every == 0 or done == self.cfg.train.epochs):
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
        card = {
            "model": self.cfg.model.model_dump(),
            "method": self.cfg.method.name,
            "loadable_as_classifier": self.method.loadable_as_classifier,
            "data": self.cfg.data.name,
            "num_classes": self.exp.data.train.num_classes,
            "classes": self.exp.data.train.classes,
            "in_channels": self.exp.data.train.in_channels,
            "image_size": self.exp.data.train.image_size,
            "normalize": {"mean": self.exp.transform.mean, "std": self.exp.transform.std},
            "tasks": [t.to_dict() for t in self.exp.tasks],
            "fingerprint": fingerprint(tensors),
            "metrics": summary,
        }
        (self.run_dir / "model.json").write_text(json.dumps(card, indent=2))
        self.method.export_extra(self.run_dir, card)
        (self.run_dir / "results.json").write_text(json.dumps(summary, indent=2))


def prepare_run_dir(cfg: RunConfig, run_dir: Optional[Path], resume: bool) -> Path:
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    if (run_dir / "ckpt" / "last.pt").exists() and not resume:  # checked on every rank: no rank is left waiting
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it or choose another --run-dir")
    if dist.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def run_training(cfg: RunConfig, run_dir: Optional[Path] = None, resume: bool = False, hooks: Optional[List[Hook]] = None) -> Dict[str, Any]:
    """Build everything from ``cfg`` and train; returns the summary (also in ``run_dir/results.json``)."""
    device = pick_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_deterministic(cfg.train.deterministic)
    dist.init_from_env(device)
    run_dir = Path(dist.broadcast_object(str(prepare_run_dir(cfg, run_dir, resume))))
    exp = build_experiment(cfg, device)
    if dist.is_main_process():
        (run_dir / "env.json").write_text(json.dumps(environment_info(device, dist.world_size()), indent=2))
    summary = Trainer(exp, run_dir, hooks).fit(resume=resume)
    summary["run_dir"] = str(run_dir)
    return summary

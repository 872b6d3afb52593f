"""A plain training run (:class:`Trainer`): epochs of the one optimisation loop (:class:`~kbricks.engine.loop.Loop`),
evaluation, best/last checkpoints, NaN stop, the model card, and hooks that see a :class:`RunState`. Opening the
run directory, resume rules and recording the config are the run lifecycle's (:mod:`kbricks.engine.run`).

The optimiser and schedule factories and ``Loop`` live in :mod:`kbricks.engine.loop` (shared with continual runs)
and are importable from here too.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from ..core import dist
from ..core.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from ..core.hooks import Hook, RunState, read_jsonl, run_hooks
from ..core.metrics import evaluate
from ..core.rundir import RunDirectory
from ..errors import TrainingDiverged
from ..models import count_parameters
from .card import write_model_card
from .experiment import Experiment
from .loop import (  # noqa: F401  (re-exported: the loop's public names, from before the loop had its own module)
    FUSED_OPTIMIZERS,
    IMPLEMENTATION_KEYS,
    Loop,
    autocast_dtype,
    compiled_or_eager,
    fused_supported,
    make_optimizer,
    make_scheduler,
    pinned,
)


class Trainer:
    """One training run of ``exp`` into ``run`` (a :class:`RunDirectory`): epochs, evaluation, checkpoints, export.
    Hooks (the run's loggers, the method's, then ``hooks``) receive ``self.state``."""

    def __init__(self, exp: Experiment, run: RunDirectory, hooks: Optional[List[Hook]] = None):
        self.exp, self.cfg, self.run = exp, exp.cfg, run
        self.run_dir, self.ckpt_dir = run.path, run.ckpt_dir
        self.method = exp.method
        self.loop = Loop(self.method, list(self.method.trainable_parameters()), exp.data.train, exp.transform, self.cfg.optim,
                         self.cfg.train, self.cfg.train.epochs, exp.device, (self.cfg.seed,), self._on_step)
        self.state = RunState(cfg=self.cfg, run_dir=self.run_dir, exp=exp, method=self.method, epochs=self.cfg.train.epochs,
                              steps_per_epoch=self.loop.steps_per_epoch, loop=self.loop)
        self.best, self.best_epoch = -1.0, 0
        self.hooks: List[Hook] = []
        if dist.is_main_process():
            self.hooks = run_hooks(self.state, plots=self.cfg.train.plots) + self.method.hooks()
        self.hooks += list(hooks or [])

    @property
    def start_epoch(self) -> int:
        return self.state.resumed_from

    # ---- checkpoints -------------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int) -> Dict[str, Any]:
        return {"model": self.method.state_dict(), **self.loop.state_dict(), "epoch": epoch, "best": self.best,
                "best_epoch": self.best_epoch, "config": self.cfg.to_dict()}

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from a checkpoint (already checked by the run lifecycle): weights, optimiser, schedule, best."""
        load_state_into(self.method, state["model"], "method")
        self.loop.load_state_dict(state)
        self.state.resumed_from, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        self.state.epoch = state["epoch"]

    def checkpoint_note(self, bad_input: bool = False) -> str:
        last = self.ckpt_dir / "last.pt"
        if not last.exists():
            return "no checkpoint was written yet (nothing to resume)"
        epoch = load_checkpoint(last).get("epoch")
        if bad_input:
            return f"the last good checkpoint (epoch {epoch}) is {last}"
        return f"the last good checkpoint (epoch {epoch}) is {last}: resume it with --resume -o optim.lr=<lower>"

    def _hook(self, name: str, *args) -> None:
        for h in self.hooks:
            getattr(h, name)(self.state, *args)

    def _on_step(self, step: int, losses: Dict[str, float]) -> None:
        self._hook("on_step_end", step, losses)

    # ---- the run -----------------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, float]:
        exp = self.exp
        m = evaluate(self.method, exp.data.test, exp.tasks, exp.transform, exp.device, self.cfg.train.eval_batch_size)
        return {f"test/{k}": v for k, v in m.items()}

    def fit(self) -> Dict[str, Any]:
        """Train from the first unfinished epoch (after :meth:`restore`, the checkpoint's next one) to train.epochs."""
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
            self.state.epoch = done
            self.state.metrics.append(metrics)
            self._hook("on_epoch_end", done, metrics)
            if dist.is_main_process() and (done % train.checkpoint_every == 0 or done == train.epochs):
                save_checkpoint(self.checkpoint_state(done), self.ckpt_dir / "last.pt")
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
        probe = self.method.teacher_probe()  # the teacher's accuracy on the training data, measured at load
        return {
            "name": self.cfg.name,
            "seed": self.cfg.seed,
            "epochs": self.cfg.train.epochs,
            "final": {k: v for k, v in last.items() if k.startswith("test/")},
            "best": {"test/acc": self.best, "epoch": self.best_epoch},
            "params": count_parameters(self.method.export_module()),
            "train_seconds_this_session": round(seconds, 2),
            "world_size": dist.world_size(),
            **({"teacher_probe": probe} if probe is not None else {}),
        }

    def export(self, summary: Dict[str, Any]) -> None:
        """Shareable weights (safetensors) + the model card that says how to rebuild them and what they scored."""
        tensors = self.method.export_module().state_dict()
        self.state.card = write_model_card(self.run, self.exp, self.method, tensors, "kbricks-model-v1", "classifier", summary)
        self.run.write_json("results.json", summary)

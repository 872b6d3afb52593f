"""The continual task loop on the engine: a strategy (SupSup, ImpressLearn, ...) learns the scenario's tasks one
after another with the same :class:`~kbricks.engine.loop.Loop`, run directory, hooks, logging, checkpoints and
NaN stop as ``kbricks train``; after each task every seen task is evaluated (the accuracy matrix), and at the end
task inference is measured when the task id is withheld.

Run directory: the usual files (config.yaml, env.json, metrics.jsonl with one row per epoch and per finished task,
summary.csv, ckpt/last.pt, results.json, model.json + model.safetensors, plots/) plus accuracy_matrix.csv. The
plugins' state (ER's buffer of training samples, LwF's teacher, EWC's Fisher) is in ckpt/last.pt only, never in
model.safetensors.
Checkpoints are written after every task; resume continues after the last finished task, and the resumed run is
identical to an uninterrupted one (randomness is derived from the seed, task, stage and epoch). Opening the run
directory, resume rules and recording the config are the run lifecycle's (:mod:`kbricks.engine.run`).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..config import InferenceConfig
from ..continual.inference import infer_task, refit_coefficients
from ..continual.metrics import cl_metrics
from ..continual.strategy import ContinualStrategy
from ..core import dist
from ..core.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from ..core.hooks import Hook, RunState, run_hooks
from ..core.io import atomic_write_text
from ..core.rundir import RunDirectory
from ..core.seeding import derive_seed
from ..data import TaskData
from ..errors import KbricksError, TrainingDiverged
from .card import import_recorded, write_model_card
from .experiment import Experiment, build_experiment, load_config
from .loop import Loop


class ContinualTrainer:
    """The task loop over ``exp.scenario`` into ``run``; hooks (the run's loggers, the strategy's, then ``hooks``)
    receive ``self.state``."""

    def __init__(self, exp: Experiment, run: RunDirectory, hooks: Optional[List[Hook]] = None):
        if not isinstance(exp.method, ContinualStrategy):
            raise TypeError("the continual loop needs a ContinualStrategy")
        self.exp, self.cfg, self.run = exp, exp.cfg, run
        self.run_dir, self.ckpt_dir = run.path, run.ckpt_dir
        self.strategy: ContinualStrategy = exp.method
        self.tasks: List[TaskData] = exp.scenario
        self.num_tasks = len(self.tasks)
        self.state = RunState(cfg=self.cfg, run_dir=self.run_dir, exp=exp, method=self.strategy, continual=True, num_tasks=self.num_tasks)
        self.R: List[List[Optional[float]]] = []
        self.seconds: List[float] = []
        self.hooks: List[Hook] = []
        if dist.is_main_process():
            self.hooks = run_hooks(self.state, plots=False) + self.strategy.hooks()
        self.hooks += list(hooks or [])

    @property
    def start_task(self) -> int:
        return self.state.resumed_from

    # ---- hooks, resume ---------------------------------------------------------------------------------------
    def _hook(self, name: str, *args) -> None:
        for h in self.hooks:
            getattr(h, name)(self.state, *args)

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue after the checkpoint's last finished task (already checked by the run lifecycle)."""
        load_state_into(self.strategy, state["model"], "continual strategy")
        self.R, self.seconds, self.state.resumed_from = state["R"], state["seconds"], state["next_task"]

    def checkpoint(self, next_task: int) -> None:
        if dist.is_main_process():
            save_checkpoint({"model": self.strategy.state_dict(), "R": self.R, "seconds": self.seconds,
                             "next_task": next_task, "config": self.cfg.to_dict()}, self.ckpt_dir / "last.pt")
            write_matrix(self.run_dir / "accuracy_matrix.csv", self.R, [t.name for t in self.tasks])

    # ---- one task --------------------------------------------------------------------------------------------
    def learn_task(self, t: int) -> None:
        s, T, st = self.strategy, self.num_tasks, self.state
        s.before_task(t)
        for i, stage in enumerate(s.stages(t)):
            params = s.begin_stage(stage)
            loop = Loop(s, params, self.tasks[stage.task].train, self.exp.transform, stage.optim, self.cfg.train, stage.epochs,
                        self.exp.device, (self.cfg.seed, t, i), lambda step, losses: self._hook("on_step_end", step, losses),
                        where=f"in task {t + 1} ({stage.name}) ")
            st.loop, st.epochs, st.steps_per_epoch, st.epoch = loop, stage.epochs, loop.steps_per_epoch, 0
            st.label = f"task {t + 1}/{T} {s.stage_label(stage)} "
            for e in range(stage.epochs):
                self._hook("on_epoch_start", e)
                te = time.time()
                row: Dict[str, Any] = {"task": t + 1, "stage": stage.name, "epoch": e + 1, "lr": loop.lr}
                try:
                    row.update(loop.run_epoch(e))
                except TrainingDiverged as exc:
                    note = f"tasks 1..{t} are kept in {self.ckpt_dir / 'last.pt'}" if t else "no task was finished yet"
                    raise TrainingDiverged(f"{exc}; {note}") from None
                row["time_s"] = time.time() - te
                st.epoch = e + 1
                st.metrics.append(row)
                self._hook("on_epoch_end", e + 1, row)
            s.end_stage(stage)
        s.after_task(t)

    def accuracy(self, j: int) -> float:
        data, bs = self.tasks[j], self.cfg.train.eval_batch_size
        x = self.exp.transform(data.test.x.to(self.exp.device), train=False)
        self.strategy.eval()
        labels = torch.cat([self.strategy.predicted_labels(x[i:i + bs], j) for i in range(0, len(x), bs)])
        return (labels.cpu() == data.test.y).float().mean().item()

    # ---- the run ---------------------------------------------------------------------------------------------
    def fit(self, stop_after: Optional[int] = None) -> Dict[str, Any]:
        """Learn the tasks from ``start_task`` (after :meth:`resume`, the first unfinished one)."""
        self._hook("on_fit_start")
        T = self.num_tasks
        for t in range(self.start_task, T):
            self.state.task = t
            self._hook("on_task_start", t)
            t0 = time.time()
            self.learn_task(t)
            self.seconds.append(time.time() - t0)
            evaluated = self.strategy.evaluated_after(t)  # not inside a block of tasks learned as a unit
            self.R.append([self.accuracy(j) if j <= t and evaluated else None for j in range(T)])
            row = {"task": t + 1, "name": self.tasks[t].name, "acc_current": self.R[t][t],
                   "avg_acc_seen": sum(self.R[t][: t + 1]) / (t + 1) if evaluated else None, "seconds": self.seconds[-1]}
            self.checkpoint(t + 1)
            self.state.metrics.append(row)
            self._hook("on_task_end", t + 1, row)
            dist.barrier()
            if stop_after is not None and t + 1 >= stop_after and t + 1 < T:
                return {"stopped_after": t + 1}
        result = self.summarize()
        if self.cfg.inference is not None and T > 1 and self.strategy.supports_task_inference():
            t0 = time.time()
            result.update(evaluate_inference(self.strategy, self.tasks, self.exp.transform, self.cfg.inference, self.cfg.seed))
            result["inference_seconds"] = time.time() - t0
        if dist.is_main_process():
            self.export(result)
        self._hook("on_fit_end", result)
        return result

    def summarize(self) -> Dict[str, Any]:
        s, full = self.strategy, [list(row) for row in self.R]
        storage = s.per_task_storage()
        return {
            "name": self.cfg.name, "seed": self.cfg.seed, "method": self.cfg.method.name, "tasks": [t.name for t in self.tasks],
            "accuracy_matrix": full, **cl_metrics(full), "final_accs": full[-1],
            "params_per_task": storage["entries"], "bytes_per_task": storage["bytes"], "per_task_state": storage["what"],
            **s.summary(), "train_seconds": sum(self.seconds), "task_seconds": list(self.seconds),
            "chance": [1.0 / t.num_classes for t in self.tasks],
        }

    def export(self, result: Dict[str, Any]) -> None:
        tensors = deployable_state(self.strategy.state_dict())
        metrics = {k: v for k, v in result.items() if k != "accuracy_matrix"}
        self.state.card = write_model_card(self.run, self.exp, self.strategy, tensors, "kbricks-supermask-v1",
                                           "supermask" if self.strategy.masked else "dense", metrics)
        self.run.write_json("results.json", result)
        if self.cfg.train.plots:
            from ..core.plots import plot_accuracy_matrix

            plot_accuracy_matrix(self.R, [t.name for t in self.tasks], self.run_dir / "plots", self.cfg.name)


def flat_state(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A state dict with its extra states (packed masks, coefficients) spread into plain tensors, for safetensors."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, torch.Tensor)})
        else:
            out[k] = v
    return out


def deployable_state(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """What ``model.safetensors`` holds: :func:`flat_state` without the plugins' state. A plugin keeps training
    material (ER: raw training samples; LwF: the previous network; EWC: the Fisher and anchor), which the checkpoint
    keeps for resuming but a model to hand on must not carry."""
    return {k: v for k, v in flat_state(state).items() if not k.startswith("plugins.")}


def trial_batch(data: TaskData, seed: int, n_img: int, task: int, trial: int) -> torch.Tensor:
    """Indices of one inference trial: a function of (seed, batch size, task, trial) only, so every rule, and every
    run on the same scenario and seed (SupSup vs ImpressLearn), sees the same batches."""
    g = torch.Generator().manual_seed(derive_seed(seed, 99, n_img, task, trial))
    return torch.randint(0, len(data.test), (n_img,), generator=g)


@torch.no_grad()
def evaluate_inference(strategy: ContinualStrategy, tasks: List[TaskData], transform, cfg: InferenceConfig, seed: int) -> Dict[str, Any]:
    """Inference without the task id over ``trials_per_task`` random test batches per task and batch size:

    * ``task_inference/<rule>/<n>img``: how often SupSup's rule (one_shot, binary) names the right task;
    * ``gnu_acc/<rule>/<n>img``: label accuracy when a wrong task counts as wrong (SupSup's GNu);
    * ``gns_acc/<rule>/<n>img``: label accuracy classifying with whatever task was inferred (shared labels);
    * ``refit_<init>``: ImpressLearn's re-fit coefficients: ``gns_acc`` is its label accuracy and ``task_inference``
      how often the stored alpha nearest to the re-fit one is the right task;
    * ``task_inference/<rule>/first_image``: fraction of tasks identified from their first test image alone (the
      SupSup notebook's "100% from 1 image" is this, with one fixed image per task);
    * ``seconds_per_inference/<rule>/<n>img``."""
    out: Dict[str, Any] = {}
    strategy.eval()
    for m in cfg.methods:
        refit = m.startswith("refit_")
        if refit and strategy.task_coefficients() is None:
            continue  # one mask per task: nothing to re-fit
        trials = (cfg.refit_trials_per_task or cfg.trials_per_task) if refit else cfg.trials_per_task
        for n_img in cfg.images:
            right_task = gnu = gns = total = 0
            t0 = time.perf_counter()
            for t, data in enumerate(tasks):
                for trial in range(trials):
                    idx = trial_batch(data, seed, n_img, t, trial)
                    x, y = transform(data.test.x[idx], train=False), data.test.y[idx]
                    if refit:
                        logits, guess = refit_coefficients(strategy, x, m[len("refit_"):], cfg.refit_steps, cfg.refit_lr)
                    else:
                        guess = infer_task(strategy, x, m, cfg.objective)
                        logits = strategy.predict_task(x, guess)
                    correct = int((logits[:, : tasks[guess].num_classes].argmax(1) == y).sum())
                    right_task += int(guess == t)
                    gns += correct
                    gnu += correct if guess == t else 0
                    total += n_img
            count = len(tasks) * trials
            out[f"task_inference/{m}/{n_img}img"] = right_task / count
            out[f"gns_acc/{m}/{n_img}img"] = gns / total
            if not refit:
                out[f"gnu_acc/{m}/{n_img}img"] = gnu / total
            out[f"seconds_per_inference/{m}/{n_img}img"] = (time.perf_counter() - t0) / count
        if cfg.first_image and not refit:
            hits = [int(infer_task(strategy, transform(d.test.x[:1], train=False), m, cfg.objective) == t) for t, d in enumerate(tasks)]
            out[f"task_inference/{m}/first_image"] = sum(hits) / len(tasks)
    out["inference_trials_per_task"] = cfg.trials_per_task
    if any(m.startswith("refit_") for m in cfg.methods) and strategy.task_coefficients() is not None:
        out["inference_refit_trials_per_task"] = cfg.refit_trials_per_task or cfg.trials_per_task
    return out


def load_continual_run(run_dir: Path) -> Experiment:
    """The experiment of a finished (or interrupted) continual run with its last checkpoint loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise KbricksError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    import_recorded(run_dir)
    exp = build_experiment(load_config(run_dir / "config.yaml"))
    state = load_checkpoint(run_dir / "ckpt" / "last.pt")
    load_state_into(exp.method, state["model"], "continual strategy")
    exp.method.eval()
    return exp


def write_matrix(path: Path, R: List[List[Optional[float]]], names: List[str]) -> None:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["after_task"] + names)
    for i, row in enumerate(R):
        w.writerow([names[i]] + ["" if v is None else f"{v:.6f}" for v in row])
    atomic_write_text(path, text.getvalue(), what=path.name)

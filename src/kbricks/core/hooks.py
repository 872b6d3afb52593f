"""Run hooks and the state they see. Loggers are hooks: they receive metrics and write them somewhere (rank 0 only).

Every hook method receives the run's :class:`RunState` first: the config, run directory, experiment, the method
being trained, where the run is (task, epoch, the running loop's length and steps) and, once written, the model
card. Continual runs also call ``on_task_start`` / ``on_task_end``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ConfigError
from .io import atomic_write_text


@dataclass
class RunState:
    """What hooks see of a running run; the engine keeps it up to date.

    The types of ``cfg`` (``kbricks.config.RunConfig``), ``exp`` (``kbricks.engine.experiment.Experiment``: data,
    tasks, transform, device) and ``loop`` (``kbricks.engine.loop.Loop``: optimiser, scheduler, batch size) live in
    higher layers than this module, so they are annotated ``Any`` here."""

    cfg: Any
    run_dir: Path
    exp: Any
    method: Any  # the Method (or continual strategy) being trained
    continual: bool = False
    num_tasks: int = 1
    task: Optional[int] = None  # continual runs: the task being learned (0-based)
    epoch: int = 0  # epochs finished in the running loop
    epochs: int = 0  # length of the running loop (a plain run's train.epochs; a continual stage's epochs)
    steps_per_epoch: int = 0
    label: str = ""  # a prefix such as "task 2/5 mask " for continual runs
    loop: Any = None  # the running Loop
    resumed_from: int = 0  # the epoch (plain) or task (continual) this session started after
    metrics: List[Dict[str, Any]] = field(default_factory=list)  # rows logged in this session
    card: Dict[str, Any] = field(default_factory=dict)  # model.json, once written (on_fit_end)

    def keep_row(self, row: Dict[str, Any]) -> bool:
        """Whether a logged row of an earlier session survives a resume (it was written before the checkpoint)."""
        return row.get("task" if self.continual else "epoch", 0) <= self.resumed_from


class Hook:
    def on_fit_start(self, state: RunState) -> None: ...
    def on_task_start(self, state: RunState, task: int) -> None: ...
    def on_epoch_start(self, state: RunState, epoch: int) -> None: ...
    def on_step_end(self, state: RunState, step: int, losses: Dict[str, float]) -> None: ...
    def on_epoch_end(self, state: RunState, epoch: int, metrics: Dict[str, Any]) -> None: ...
    def on_task_end(self, state: RunState, task: int, metrics: Dict[str, Any]) -> None: ...
    def on_fit_end(self, state: RunState, summary: Dict[str, Any]) -> None: ...


def run_hooks(state: RunState, plots: bool) -> List[Hook]:
    """The loggers of every run (rank 0): metrics.jsonl, summary.csv, progress, and with ``plots`` the curves."""
    metrics = Path(state.run_dir) / "metrics.jsonl"
    hooks: List[Hook] = [JsonlLogger(metrics), CsvSummary(Path(state.run_dir) / "summary.csv", metrics),
                         ProgressBar(state.cfg.train.progress)]
    if plots:
        hooks.append(PlotCurves(metrics, Path(state.run_dir) / "plots"))
    if "tensorboard" in state.cfg.train.loggers:
        hooks.append(TensorBoardLogger(Path(state.run_dir) / "tb"))
    return hooks


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
    return rows


class JsonlLogger(Hook):
    """One JSON object per epoch (and per finished task) in ``metrics.jsonl``. On resume, rows written after the
    checkpoint are dropped, so the file always describes one uninterrupted run."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_fit_start(self, state: RunState) -> None:
        keep = [r for r in read_jsonl(self.path) if state.keep_row(r)]  # atomic: a crash here must not lose the history
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep), what="metrics.jsonl")

    def _append(self, row: Dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_epoch_end(self, state: RunState, epoch: int, metrics: Dict[str, Any]) -> None:
        self._append(metrics)

    def on_task_end(self, state: RunState, task: int, metrics: Dict[str, Any]) -> None:
        self._append(metrics)


class CsvSummary(Hook):
    """``summary.csv``: one row per epoch, rewritten from metrics.jsonl so columns stay consistent."""

    def __init__(self, path: Path, jsonl: Path):
        self.path, self.jsonl = Path(path), Path(jsonl)

    def on_epoch_end(self, state: RunState, epoch: int, metrics: Dict[str, Any]) -> None:
        write_csv(self.path, read_jsonl(self.jsonl))

    on_task_end = on_epoch_end


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, text.getvalue(), what=Path(path).name)


class ProgressBar(Hook):
    """tqdm bar over steps when attached to a terminal (or forced on); a one-line epoch summary otherwise."""

    SHOWN = ("train/loss", "test/acc", "lr", "acc_current", "avg_acc_seen")

    def __init__(self, mode: str = "auto"):
        self.enabled = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.quiet = mode == "off"
        self.bar = None

    def on_epoch_start(self, state: RunState, epoch: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=state.steps_per_epoch, desc=f"{state.label}epoch {epoch + 1}/{state.epochs}", leave=False)

    def on_step_end(self, state: RunState, step: int, losses: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}")

    def on_epoch_end(self, state: RunState, epoch: int, metrics: Dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.quiet:
            self._print(state, f"{state.label}epoch {epoch}/{state.epochs}", metrics)

    def on_task_end(self, state: RunState, task: int, metrics: Dict[str, Any]) -> None:
        if not self.quiet:
            self._print(state, f"task {task}/{state.num_tasks} done", metrics)

    def _print(self, state: RunState, head: str, metrics: Dict[str, Any]) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in self.SHOWN and v is not None)
        print(f"[{state.cfg.name}] {head} {text}", file=sys.stderr, flush=True)


class PlotCurves(Hook):
    """Loss and accuracy curves from metrics.jsonl at the end of the run."""

    def __init__(self, jsonl: Path, out_dir: Path):
        self.jsonl, self.out_dir = Path(jsonl), Path(out_dir)

    def on_fit_end(self, state: RunState, summary: Dict[str, Any]) -> None:
        from .plots import draw_in_background, plot_curves

        rows = [r for r in read_jsonl(self.jsonl) if "epoch" in r and "task" not in r]
        draw_in_background(plot_curves, rows, self.out_dir / "curves.png", title=state.cfg.name)


# ---- TensorBoard (train.loggers: [tensorboard]) ---------------------------------------------------------------
# Event files in <run>/tb: every numeric value of every logged row (the rows of metrics.jsonl) as a scalar, and at
# the end the run's plots (plots/*.png) as images. Plain runs: the step is the epoch (a resumed run purges the events
# after its checkpoint, as metrics.jsonl drops its rows). Continual runs: per-epoch rows go to
# task<t>/<stage>/<name> with the stage's epoch as step, per-task rows to tasks/<name> with the task as step.

POSITION_KEYS = ("epoch", "task", "stage", "name")


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.loggers: tensorboard needs the tensorboard package: pip install 'kbricks[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLogger(Hook):
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer_class = _writer_class()  # fails before training starts when tensorboard is missing
        self.writer = None
        self.last_step = 0

    def on_fit_start(self, state: RunState) -> None:
        purge = state.resumed_from + 1 if (state.resumed_from and not state.continual) else None
        self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=purge)

    def _scalars(self, prefix: str, row: Dict[str, Any], step: int) -> None:
        for key, value in row.items():
            if key in POSITION_KEYS or isinstance(value, bool) or not isinstance(value, Real):
                continue
            self.writer.add_scalar(prefix + key, float(value), step)
        self.last_step = max(self.last_step, step)

    def on_epoch_end(self, state: RunState, epoch: int, metrics: Dict[str, Any]) -> None:
        if self.writer is None:
            return
        if state.continual and "task" in metrics:
            self._scalars(f"task{metrics['task']}/{metrics.get('stage', 'train')}/", metrics, int(metrics.get("epoch", epoch)))
        else:
            self._scalars("", metrics, int(metrics.get("epoch", epoch)))
        self.writer.flush()

    def on_task_end(self, state: RunState, task: int, metrics: Dict[str, Any]) -> None:
        if self.writer is not None:
            self._scalars("tasks/", metrics, int(metrics.get("task", task)))
            self.writer.flush()

    def on_fit_end(self, state: RunState, summary: Dict[str, Any]) -> None:
        if self.writer is None:
            return
        from .plots import wait_for_plots

        wait_for_plots()  # the curves are drawn on a background thread
        for png in sorted((Path(state.run_dir) / "plots").glob("*.png")):
            image = _read_png(png)
            if image is not None:
                self.writer.add_image(f"plots/{png.stem}", image, self.last_step, dataformats="HWC")
        self.writer.close()
        self.writer = None


def _read_png(path: Path) -> Optional[Any]:
    """The PNG as an HWC uint8 array (RGB), or None when no image reader is installed (the scalars still count)."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))

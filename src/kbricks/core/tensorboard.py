"""TensorBoard logging as a run hook (``train.loggers: [tensorboard]``): event files in ``<run>/tb``.

What is written: every numeric value of every logged row (the same rows as ``metrics.jsonl``) as a scalar, and at
the end of the run the run's plots (``plots/*.png``) as images. Plain runs: the step is the epoch. Continual runs:
per-epoch rows go to ``task<t>/<stage>/<name>`` with the stage's epoch as step, per-task rows (accuracy on the
current task, average over seen tasks, ...) to ``tasks/<name>`` with the task as step.

A resumed plain run purges the events after its checkpoint (as ``metrics.jsonl`` drops its rows), so the curves
describe one uninterrupted run.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import ConfigError
from .hooks import Hook, RunState

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

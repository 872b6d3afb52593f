"""Trainer hooks. Loggers are hooks: they receive metrics and write them somewhere (rank 0 only).

A trainer passed to a hook exposes ``cfg``, ``epochs`` and ``steps_per_epoch`` of the loop that is running,
``label`` (a prefix such as ``"task 2/5 "`` for continual runs) and ``keep_row(row)`` (which logged rows survive a
resume). Continual runs also call ``on_task_start`` / ``on_task_end``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List


class Hook:
    def on_fit_start(self, trainer) -> None: ...
    def on_task_start(self, trainer, task: int) -> None: ...
    def on_epoch_start(self, trainer, epoch: int) -> None: ...
    def on_step_end(self, trainer, step: int, losses: Dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None: ...
    def on_task_end(self, trainer, task: int, metrics: Dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer, summary: Dict[str, Any]) -> None: ...


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

    def on_fit_start(self, trainer) -> None:
        keep = [r for r in read_jsonl(self.path) if trainer.keep_row(r)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def _append(self, row: Dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        self._append(metrics)

    def on_task_end(self, trainer, task: int, metrics: Dict[str, Any]) -> None:
        self._append(metrics)


class CsvSummary(Hook):
    """``summary.csv``: one row per epoch, rewritten from metrics.jsonl so columns stay consistent."""

    def __init__(self, path: Path, jsonl: Path):
        self.path, self.jsonl = Path(path), Path(jsonl)

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        write_csv(self.path, read_jsonl(self.jsonl))

    on_task_end = on_epoch_end


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


class ProgressBar(Hook):
    """tqdm bar over steps when attached to a terminal (or forced on); a one-line epoch summary otherwise."""

    SHOWN = ("train/loss", "test/acc", "lr", "acc_current", "avg_acc_seen")

    def __init__(self, mode: str = "auto"):
        self.enabled = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.quiet = mode == "off"
        self.bar = None

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"{trainer.label}epoch {epoch + 1}/{trainer.epochs}", leave=False)

    def on_step_end(self, trainer, step: int, losses: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}")

    def on_epoch_end(self, trainer, epoch: int, metrics: Dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.quiet:
            self._print(trainer, f"{trainer.label}epoch {epoch}/{trainer.epochs}", metrics)

    def on_task_end(self, trainer, task: int, metrics: Dict[str, Any]) -> None:
        if not self.quiet:
            self._print(trainer, f"task {task}/{trainer.num_tasks} done", metrics)

    def _print(self, trainer, head: str, metrics: Dict[str, Any]) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in self.SHOWN and v is not None)
        print(f"[{trainer.cfg.name}] {head} {text}", file=sys.stderr, flush=True)


class PlotCurves(Hook):
    """Loss and accuracy curves from metrics.jsonl at the end of the run."""

    def __init__(self, jsonl: Path, out_dir: Path):
        self.jsonl, self.out_dir = Path(jsonl), Path(out_dir)

    def on_fit_end(self, trainer, summary: Dict[str, Any]) -> None:
        from .plots import draw_in_background, plot_curves

        rows = [r for r in read_jsonl(self.jsonl) if "epoch" in r and "task" not in r]
        draw_in_background(plot_curves, rows, self.out_dir / "curves.png", title=trainer.cfg.name)

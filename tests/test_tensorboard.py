"""TensorBoard logging: the event files a run writes are read back and equal what metrics.jsonl says."""

import pytest

from kbricks.core.hooks import read_jsonl
from kbricks.engine.run import run_training

pytest.importorskip("tensorboard")


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_a_run_writes_scalars_and_plots_that_read_back(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**{"train.epochs": 3, "train.plots": True, "train.loggers": "[tensorboard]"})
    run_training(cfg, tmp_path / "run")
    acc = events(tmp_path / "run" / "tb")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for key in ("train/loss", "test/acc", "lr"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    assert "plots/curves" in acc.Tags()["images"]
    image = acc.Images("plots/curves")[0]
    assert image.width > 100 and image.height > 100 and image.step == 3


def test_a_resumed_run_has_one_event_per_epoch(tmp_path, tiny_cfg):
    run_training(tiny_cfg(**{"train.epochs": 2, "train.plots": False, "train.loggers": "[tensorboard]"}), tmp_path / "run")
    run_training(tiny_cfg(**{"train.epochs": 4, "train.plots": False, "train.loggers": "[tensorboard]"}), tmp_path / "run", resume=True)
    steps = [e.step for e in events(tmp_path / "run" / "tb").Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == steps


def test_a_continual_run_logs_tasks(tmp_path):
    from kbricks import build_config

    cfg = build_config({"name": "cl", "data": {"name": "digits", "train_subset": 200, "scenario": {"name": "split", "num_tasks": 2}},
                        "model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "method": {"name": "supsup"},
                        "optim": {"name": "adam", "lr": 0.01},
                        "train": {"epochs": 1, "batch_size": 50, "progress": "off", "plots": False, "loggers": ["tensorboard"]},
                        "inference": {"trials_per_task": 2}})
    run_training(cfg, tmp_path / "cl")
    acc = events(tmp_path / "cl" / "tb")
    assert [e.step for e in acc.Scalars("tasks/acc_current")] == [1, 2]
    assert any(t.startswith("task2/") for t in acc.Tags()["scalars"])

import json

import pytest
import torch

from kbricks.core.checkpoint import load_checkpoint, load_safetensors
from kbricks.core.hooks import Hook, RunState, read_jsonl
from kbricks.core.plots import wait_for_plots
from kbricks.engine.card import CARD_KEYS
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_training
from kbricks.errors import ConfigError, TrainingDiverged
from kbricks.models import create_model


def test_run_dir_contents_and_learning(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"train.epochs": 3, "train.plots": True})
    summary = run_training(cfg, tmp_path / "run")
    run = tmp_path / "run"
    wait_for_plots()  # drawn on a background thread, off the training path
    assert (run / "plots/curves.png").read_bytes().startswith(b"\x89PNG")
    for f in ("config.yaml", "env.json", "metrics.jsonl", "summary.csv", "ckpt/last.pt", "ckpt/best.pt", "model.safetensors", "model.json", "results.json", "plots/curves.png"):
        assert (run / f).exists(), f
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert summary["final"]["test/acc"] > 0.6  # 10 classes: chance is 0.1
    csv_lines = (run / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("epoch,lr,train/ce,train/loss,test/acc")
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["world_size"] == 1
    # the exported safetensors rebuild the network and give the same predictions
    card = json.loads((run / "model.json").read_text())
    assert tuple(card) == CARD_KEYS and card["network"] == "classifier" and card["scenario"] is None and card["imports"] == []
    net = create_model(card["model"]["name"], num_classes=card["num_classes"], in_channels=card["in_channels"], image_size=card["image_size"], **card["model"]["kwargs"])
    net.load_state_dict(load_safetensors(run / "model.safetensors"))
    exp = build_experiment(cfg)
    x = exp.transform(exp.data.test.x[:50], train=False)
    acc = (net.eval()(x).argmax(1) == exp.data.test.y[:50]).float().mean().item()
    assert acc > 0.6


def test_resume_replays_exactly(tiny_cfg, tmp_path):
    full = run_training(tiny_cfg(**{"train.epochs": 4}), tmp_path / "full")

    class Kill(Hook):
        def on_epoch_end(self, trainer, epoch, metrics):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_cfg(**{"train.epochs": 4}), tmp_path / "part", hooks=[Kill()])
    assert load_checkpoint(tmp_path / "part/ckpt/last.pt")["epoch"] == 1  # killed before epoch 2 was saved
    with pytest.raises(ConfigError, match="pass --resume"):
        run_training(tiny_cfg(**{"train.epochs": 4}), tmp_path / "part")
    resumed = run_training(tiny_cfg(**{"train.epochs": 4}), tmp_path / "part", resume=True)
    a = load_checkpoint(tmp_path / "full/ckpt/last.pt")["model"]
    b = load_checkpoint(tmp_path / "part/ckpt/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == full["final"]
    rows = read_jsonl(tmp_path / "part/metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]  # the stale epoch-2 row was dropped and rewritten
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in read_jsonl(tmp_path / "full/metrics.jsonl")]


def test_hooks_receive_the_run_state(tiny_cfg, tmp_path):
    """Every hook call gets the same typed RunState: config, run directory, method, loop, where the run is, the rows
    logged so far, and at the end the model card."""
    seen = []

    class Watch(Hook):
        def on_fit_start(self, state):
            assert isinstance(state, RunState) and not state.continual and state.task is None
            assert state.run_dir == tmp_path / "r" and state.cfg.name == "tiny" and state.exp.method is state.method
            assert state.epochs == state.cfg.train.epochs and state.steps_per_epoch == 256 // 32 and state.loop.batch_size == 32
            seen.append(("start", state.epoch, len(state.metrics), dict(state.card)))

        def on_epoch_end(self, state, epoch, metrics):
            assert state.metrics[-1] is metrics and state.epoch == epoch
            seen.append(("epoch", state.epoch, len(state.metrics), dict(state.card)))

        def on_fit_end(self, state, summary):
            seen.append(("end", state.epoch, len(state.metrics), dict(state.card)))

    run_training(tiny_cfg(**{"train.epochs": 3}), tmp_path / "r", hooks=[Watch()])
    assert [s[:3] for s in seen] == [("start", 0, 0), ("epoch", 1, 1), ("epoch", 2, 2), ("epoch", 3, 3), ("end", 3, 3)]
    assert all(not s[3] for s in seen[:-1])  # the card exists once the run exported it
    written = json.loads((tmp_path / "r/model.json").read_text())
    assert tuple(seen[-1][3]) == CARD_KEYS and seen[-1][3]["fingerprint"] == written["fingerprint"]
    # a resumed session starts where the checkpoint is: rows of earlier epochs are kept, later ones dropped
    seen.clear()
    run_training(tiny_cfg(**{"train.epochs": 4}), tmp_path / "r", resume=True, hooks=[Watch()])
    assert [s[:3] for s in seen] == [("start", 3, 0), ("epoch", 4, 1), ("end", 4, 1)]


def test_fused_kernels_fall_back_when_torch_hides_its_device_list(monkeypatch):
    import torch.utils._foreach_utils as fu

    from kbricks.engine import loop

    monkeypatch.delattr(fu, "_get_fused_kernels_supported_devices")
    assert loop.fused_devices() == {"cuda"}
    assert not loop.fused_supported([torch.nn.Parameter(torch.zeros(2))])  # CPU parameters: the per-parameter update


def test_resume_refuses_a_changed_model(tiny_cfg, tmp_path):
    run_training(tiny_cfg(), tmp_path / "r")
    with pytest.raises(Exception, match="different 'model' config"):
        run_training(tiny_cfg(**{"model.kwargs.hidden": [16]}), tmp_path / "r", resume=True)


def test_resume_can_extend_training(tiny_cfg, tmp_path):
    run_training(tiny_cfg(), tmp_path / "r")
    out = run_training(tiny_cfg(**{"train.epochs": 3}), tmp_path / "r", resume=True)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r/metrics.jsonl")] == [1, 2, 3]
    assert out["epochs"] == 3


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tiny_cfg, tmp_path):
    class Poison(Hook):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                with torch.no_grad():
                    next(trainer.method.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 1 .*last good checkpoint"):
        run_training(tiny_cfg(), tmp_path / "r", hooks=[Poison()])
    state = load_checkpoint(tmp_path / "r/ckpt/last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_seed_determines_run(tiny_cfg, tmp_path):
    a = run_training(tiny_cfg(seed=3), tmp_path / "a")
    b = run_training(tiny_cfg(seed=3), tmp_path / "b")
    c = run_training(tiny_cfg(seed=4), tmp_path / "c")
    la = read_jsonl(tmp_path / "a/metrics.jsonl")
    assert la == [dict(rb, time_s=ra["time_s"]) for rb, ra in zip(read_jsonl(tmp_path / "b/metrics.jsonl"), la)]
    assert read_jsonl(tmp_path / "c/metrics.jsonl")[0]["train/loss"] != la[0]["train/loss"]
    assert a["final"] == b["final"] and c["seed"] == 4


def test_batch_larger_than_dataset(tiny_cfg, tmp_path):
    from kbricks.errors import DataError

    with pytest.raises(DataError, match="fewer than one batch"):
        run_training(tiny_cfg(**{"data.train_subset": 10}), tmp_path / "r")


def test_class_tasks_report_per_task_accuracy(tiny_cfg, tmp_path):
    s = run_training(tiny_cfg(**{"data.tasks": "{split: 2}"}), tmp_path / "r")
    assert set(s["final"]) == {"test/acc", "test/acc_classes_0-1-2-3-4", "test/acc_classes_5-6-7-8-9"}
    # task-aware accuracy (argmax within a task's 5 classes) is at least the 10-way accuracy
    assert min(s["final"]["test/acc_classes_0-1-2-3-4"], s["final"]["test/acc_classes_5-6-7-8-9"]) >= s["final"]["test/acc"] - 0.05


def test_multihead_teacher_on_dsprites(tmp_path):
    from kbricks import build_config

    cfg = build_config({
        "data": {"name": "dsprites", "kwargs": {"n_samples": 400, "image_size": 16, "num_orientations": 4, "num_positions": 4},
                 "tasks": {"latents": ["shape", "pos_x"]}, "augment": {"normalize": False}},
        "model": {"name": "small_cnn", "kwargs": {"widths": [8, 16]}},
        "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0},
        "train": {"epochs": 4, "batch_size": 32, "progress": "off", "plots": False},
    })
    s = run_training(cfg, tmp_path / "r")
    assert set(s["final"]) == {"test/acc", "test/acc_shape", "test/acc_pos_x"}
    assert s["final"]["test/acc_pos_x"] > 0.4  # 4 positions: chance 0.25
    rows = read_jsonl(tmp_path / "r/metrics.jsonl")
    assert "train/ce_shape" in rows[0] and "train/ce_pos_x" in rows[0]


@pytest.mark.slow  # a full-budget reproduction; the other trainer tests check the loop on tiny budgets
def test_digits_teacher_reaches_97_percent(tmp_path):
    """The shipped teacher recipe (the issue's acceptance bar: >= 97% on digits)."""
    from conftest import REPO
    from kbricks import load_config

    cfg = load_config(f"{REPO}/configs/teacher/digits_cnn.yaml", ["train.progress=off", "train.plots=false"])
    s = run_training(cfg, tmp_path / "r")
    assert s["final"]["test/acc"] >= 0.97


@pytest.mark.slow
def test_mnist5k_teacher_reaches_95_percent(tmp_path):
    from conftest import REPO
    from kbricks import load_config

    cfg = load_config(f"{REPO}/configs/teacher/mnist5k_cnn.yaml", ["train.progress=off"])
    assert run_training(cfg, tmp_path / "r")["final"]["test/acc"] >= 0.95

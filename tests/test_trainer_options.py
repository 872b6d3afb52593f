"""Trainer performance options: evaluation frequency, autocast, channels-last, torch.compile fallback, threads."""

import json

import pytest
import torch

from kbricks.core.hooks import read_jsonl
from kbricks.core.seeding import default_threads
from kbricks.engine.run import run_training
from kbricks.errors import ConfigError


@pytest.mark.parametrize("every, evaluated", [(0, [3]), (2, [2, 3]), (1, [1, 2, 3])])
def test_evaluation_frequency(tiny_cfg, tmp_path, every, evaluated):
    run_training(tiny_cfg(**{"train.epochs": 3, "train.eval_every": every}), tmp_path / "run")
    rows = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [r["epoch"] for r in rows if "test/acc" in r] == evaluated
    assert json.loads((tmp_path / "run/results.json").read_text())["final"]["test/acc"] > 0.5


def test_bf16_autocast_on_cpu_trains(tiny_cfg, tmp_path):
    s = run_training(tiny_cfg(**{"train.precision": "bf16", "train.epochs": 3}), tmp_path / "run")
    rows = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] and s["final"]["test/acc"] > 0.5


def test_channels_last_cnn_trains_like_contiguous(tiny_cfg, tmp_path):
    over = {"model.name": "small_cnn", "model.kwargs": "{widths: [8, 16]}", "train.epochs": 2}
    a = run_training(tiny_cfg(**over), tmp_path / "a")
    b = run_training(tiny_cfg(**over, **{"train.channels_last": True}), tmp_path / "b")
    la = [r["train/loss"] for r in read_jsonl(tmp_path / "a/metrics.jsonl")]
    lb = [r["train/loss"] for r in read_jsonl(tmp_path / "b/metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-3) and abs(a["final"]["test/acc"] - b["final"]["test/acc"]) <= 0.02


def test_compile_falls_back_to_eager_with_a_warning(tiny_cfg, tmp_path, monkeypatch, capsys):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = run_training(tiny_cfg(), tmp_path / "eager")
    fallback = run_training(tiny_cfg(**{"train.compile": True}), tmp_path / "compiled")
    assert "torch.compile failed (RuntimeError: no C++ compiler found); training eagerly" in capsys.readouterr().err
    assert fallback["final"] == eager["final"]  # the same run, bit for bit


def test_thread_policy(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("KBRICKS_THREADS", raising=False)
    assert default_threads() == 1
    monkeypatch.setenv("KBRICKS_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("KBRICKS_THREADS", "two")
    with pytest.raises(ConfigError, match="KBRICKS_THREADS"):
        default_threads()
    monkeypatch.setenv("KBRICKS_THREADS", "2")
    run_training(tiny_cfg(), tmp_path / "env")
    run_training(tiny_cfg(**{"train.num_threads": 1}), tmp_path / "cfg")  # the config wins over the environment
    assert json.loads((tmp_path / "env/env.json").read_text())["threads"] == 2
    assert json.loads((tmp_path / "cfg/env.json").read_text())["threads"] == 1


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizer_uses_the_fused_update_where_torch_has_one_and_it_matches_the_loop(name):
    from kbricks.config import OptimConfig
    from kbricks.engine.trainer import make_optimizer

    torch.manual_seed(0)
    shapes = [(16, 1, 3, 3), (16,), (8, 32), (8,)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    cfg = OptimConfig(name=name, lr=0.05, momentum=0.9, nesterov=name == "sgd", weight_decay=5e-4)
    finals = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make_optimizer(cfg, params)
        assert opt.param_groups[0].get("fused") is (True if name != "rmsprop" else None)
        if not fused:
            opt.param_groups[0]["fused"] = None  # torch's per-parameter loop
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        finals[fused] = params
    for a, b in zip(finals[True], finals[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_an_unfused_optimizer_resumes_with_the_fused_update(tiny_cfg, tmp_path):
    from kbricks.core.checkpoint import load_checkpoint, save_checkpoint

    run_training(tiny_cfg(), tmp_path / "run")
    path = tmp_path / "run/ckpt/last.pt"
    state = load_checkpoint(path)
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    for g in state["optimizer"]["param_groups"]:
        g["fused"] = None  # as written before kbricks used the fused update
    save_checkpoint(state, path)
    run_training(tiny_cfg(**{"train.epochs": 3}), tmp_path / "run", resume=True)
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 3 and resumed["optimizer"]["param_groups"][0]["fused"] is True

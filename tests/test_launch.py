"""The cluster launcher, exercised with submitit's local executor: jobs are separate processes that see the
caller's plugins, a sweep's seeds come back in order as they would from the pool, and a failed job is one line
that names its log."""

import json
import os
from pathlib import Path

import pytest
import yaml

from kbricks.engine.launch import (
    ClusterOptions,
    LaunchError,
    SubmititLauncher,
    submit_command,
    torchrun_command,
    without_launcher_options,
)
from kbricks.engine.parallel import launching, run_parallel
from kbricks.errors import ConfigError

pytest.importorskip("submitit")


def where_am_i(i):
    import torch

    from kbricks.models import MODELS

    return {"i": i, "pid": os.getpid(), "threads": torch.get_num_threads(), "plugin": "launch_probe_net" in MODELS}


@pytest.fixture
def local(tmp_path):
    return SubmititLauncher(ClusterOptions(folder=tmp_path / "jobs", cluster="local", cpus=1, time_min=5))


def test_jobs_run_elsewhere_with_the_callers_plugins_and_a_failed_command_is_one_line(tmp_path, monkeypatch, local, capfd):
    (tmp_path / "launch_plugin.py").write_text(
        "from kbricks.models import MODELS\n@MODELS.register('launch_probe_net')\ndef net(num_classes=10):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import launch_plugin  # noqa: F401  (registered here only, as --import does)

    with launching(local):
        ok = run_parallel([(where_am_i, (7,), {})], workers=1)[0]
    assert ok["i"] == 7 and ok["pid"] != os.getpid() and ok["plugin"] and ok["threads"] == 1
    # outside the block the pool (here: this process) is back
    assert run_parallel([(where_am_i, (9,), {})], workers=1)[0]["pid"] == os.getpid()
    # a command as one job (kbricks train --launcher submitit): its failure is one line naming the job's log
    argv = ["train", str(tmp_path / "missing.yaml"), "--launcher", "submitit", "--cluster=local", "--gpus", "1"]
    assert without_launcher_options(argv) == ["train", str(tmp_path / "missing.yaml")]
    with pytest.raises(LaunchError) as err:
        submit_command(local, argv)
    message = str(err.value)
    assert "\n" not in message and "1 of 1 job(s) failed" in message and "exited with status 2" in message
    assert "submitit (local" in capfd.readouterr().err
    log = Path(message.rsplit("log: ", 1)[1].rstrip(")"))
    assert log.exists() and "missing.yaml" in log.read_text() + log.with_suffix(".out").read_text()


def test_a_sweep_through_the_launcher_from_the_command_line(tmp_path):
    from kbricks.cli import main
    from kbricks.engine.sweep import run_sweep

    cfg = {"name": "tiny", "data": {"name": "digits", "train_subset": 128},
           "model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "optim": {"name": "sgd", "lr": 0.1},
           "train": {"epochs": 1, "batch_size": 32, "progress": "off", "plots": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(path), "--seeds", "0", "1", "--out", str(tmp_path / "sweep"), "--launcher", "submitit",
                 "--cluster", "local", "--submitit-dir", str(tmp_path / "jobs"), "--time", "5"]) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [0, 1]
    assert len(list((tmp_path / "jobs").glob("*_log.out"))) == 2  # one job per seed
    for seed in (0, 1):
        result = json.loads((tmp_path / "sweep" / f"seed{seed}" / "results.json").read_text())
        assert 0.0 <= result["final"]["test/acc"] <= 1.0
    # a second sweep reuses the finished runs: no job is needed, the numbers are the same
    again = run_sweep(path, [0, 1], tmp_path / "sweep", workers=1)
    assert again["last_acc"] == summary["last_acc"]


def test_options_are_checked_and_torchrun_is_torchs_launcher(tmp_path):
    with pytest.raises(ConfigError, match="--cluster 'nowhere'"):
        SubmititLauncher(ClusterOptions(folder=tmp_path, cluster="nowhere"))
    cmd = torchrun_command(4, ["train", "cfg.yaml"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=4" in cmd
    assert cmd[-3:] == ["kbricks", "train", "cfg.yaml"]

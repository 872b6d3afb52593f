import json
import subprocess
import sys

import yaml

from kbricks.cli import main

TINY = {
    "name": "cli",
    "data": {"name": "digits", "train_subset": 128},
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "train": {"epochs": 1, "batch_size": 32, "progress": "off", "plots": False},
}


def write_cfg(tmp_path, data=TINY):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_train_evaluate_and_resume_via_cli(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "-o", "optim.lr=0.2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run_dir"] == str(run) and 0 <= out["final"]["test/acc"] <= 1
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.2
    assert main(["evaluate", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test/acc"] == out["final"]["test/acc"] and ev["epoch"] == 1
    # resume with the run's own config, extending to 2 epochs
    assert main(["train", "--resume", "--run-dir", str(run), "-o", "train.epochs=2"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    bad = dict(TINY, optim={"lr": 0.1, "momentun": 0.9})
    assert main(["train", str(write_cfg(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "optim.momentun: unknown key" in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", str(write_cfg(tmp_path)), "-o", "data.name=cifar10", "-o", f"data.root={tmp_path}/nodata", "--run-dir", str(tmp_path / "r")]) == 2
    assert "data path" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_corrupt_checkpoint_via_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(write_cfg(tmp_path)), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    (run / "ckpt" / "last.pt").write_bytes(b"broken")
    assert main(["evaluate", str(run)]) == 2
    assert "corrupt or not a kbricks checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", "--run-dir", str(run)]) == 2


def test_list_and_module_entry_point(tmp_path, capsys):
    assert main(["list", "models", "--pattern", "wrn*"]) == 0
    assert capsys.readouterr().out.split() == ["models:", "wrn", "wrn28_10", "wrn28_2", "wrn28_4"]
    # `python -m kbricks` in a fresh process: a bad command is one line and exit status 2
    bad = subprocess.run([sys.executable, "-m", "kbricks", "train", str(tmp_path / "x.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("kbricks: error:")


def test_list_shows_masked_models_continual_methods_and_scenarios(capsys):
    assert main(["list", "models", "--tag", "masked"]) == 0
    out = capsys.readouterr().out.split()
    assert "masked_mlp" in out and "masked_convnet" in out and "resnet20" not in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("scenarios:", "permuted", "rotated", "split", "supsup  [continual]", "impresslearn  [continual]",
                   "masked_mlp  [masked]", "continual/supsup_permuted.yaml", "kf  [factorization]"):
        assert needle in out, needle


def test_user_code_via_import_appears_in_list(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models_plugin.py").write_text(
        "from torch import nn\n"
        "from kbricks.models import MODELS\n"
        "@MODELS.register('my_tiny_mlp', tags=('user',))\n"
        "def my_tiny_mlp(num_classes=10, in_channels=1, image_size=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["--import", "my_models_plugin", "list", "models", "--tag", "user"]) == 0
    assert capsys.readouterr().out.split() == ["models:", "my_tiny_mlp", "[user]"]
    assert main(["--import", "no_such_module_xyz", "list"]) == 2
    assert "--import no_such_module_xyz: ModuleNotFoundError" in capsys.readouterr().err


def test_continual_run_through_the_train_command(tmp_path, capsys):
    cfg = {"name": "cl", "data": {"name": "digits", "scenario": {"name": "split", "num_tasks": 2}},
           "model": {"name": "masked_mlp", "kwargs": {"hidden": [32]}}, "method": {"name": "supsup"},
           "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "schedule": "constant"},
           "train": {"epochs": 2, "batch_size": 64, "progress": "off", "plots": False}}
    run = tmp_path / "run"
    assert main(["train", str(write_cfg(tmp_path, cfg)), "--run-dir", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run_dir"] == str(run) and len(out["final_accs"]) == 2 and out["forgetting"] == 0.0
    for f in ("config.yaml", "env.json", "metrics.jsonl", "summary.csv", "ckpt/last.pt", "results.json", "model.json"):
        assert (run / f).exists(), f
    assert main(["train", str(write_cfg(tmp_path, cfg)), "--run-dir", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_options_prints_a_methods_options_with_types_defaults_and_descriptions(capsys):
    assert main(["options", "kd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "method kd (kbricks.methods.kd.KnowledgeDistillation; distillation)"
    assert "  method.teacher: NetworkSpec (required)" in lines
    assert "  method.temperature: float (default 4.0, > 0)" in lines
    i = lines.index("  method.alpha: float (default 0.9, >= 0, <= 1)")
    assert lines[i + 1] == "      weight of the KD term; 1 - alpha weighs the CE term"
    assert main(["options", "impresslearn"]) == 0
    out = capsys.readouterr().out
    assert "  method.source: one of 'heterogeneous', 'homogeneous', 'random', 'stored' (default \"heterogeneous\")" in out
    assert "  method.slots: list[int] | None (default null)" in out
    assert main(["options", "no_such_method"]) == 2
    assert "unknown method 'no_such_method'" in capsys.readouterr().err

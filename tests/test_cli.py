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


def test_list_and_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kbricks", "list", "models", "--pattern", "wrn*"], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["models:", "wrn", "wrn28_10", "wrn28_2", "wrn28_4"]
    bad = subprocess.run([sys.executable, "-m", "kbricks", "train", str(tmp_path / "x.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("kbricks: error:")

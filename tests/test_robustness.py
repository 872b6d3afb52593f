"""Issue 13: every bad input and fault a new user met, reproduced. Each case ends in one of three outcomes: a one-line
error naming the problem (exit 2, ``kbricks: error: ...``, no traceback), a refusal that leaves the existing run
untouched, or a correct result (bit-identical resumes, unique directories, applied overrides).

Most cases run ``kbricks.cli.main`` in-process; subprocesses only where a second process or a signal is the point
(a run holding its directory while another starts, ``kill -9``, SIGINT, two runs started in the same second).
"""

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from kbricks.cli import main
from kbricks.core.checkpoint import load_checkpoint, load_safetensors, save_safetensors
from kbricks.core.hooks import Hook, read_jsonl
from kbricks.data import DATASETS, ArrayDataset, DataSplits
from kbricks.engine.run import run_training
from kbricks.errors import CheckpointError, DataError, TrainingDiverged

WORKER = os.path.join(REPO, "tests", "robust_worker.py")
SRC = os.path.join(REPO, "src")

TINY = {
    "name": "robust",
    "data": {"name": "digits", "train_subset": 128},
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "optim": {"name": "sgd", "lr": 0.1, "schedule": "constant"},
    "train": {"epochs": 1, "batch_size": 32, "progress": "off", "plots": False},
}
CONTINUAL = {
    "name": "cl", "data": {"name": "digits", "train_subset": 256, "scenario": {"name": "split", "num_tasks": 2}},
    "model": {"name": "masked_mlp", "kwargs": {"hidden": [16]}}, "method": {"name": "supsup"},
    "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "schedule": "constant"},
    "train": {"epochs": 1, "batch_size": 64, "progress": "off", "plots": False},
}


# ---- helpers ---------------------------------------------------------------------------------------------------


def write_cfg(path: Path, data=None, **top) -> Path:
    data = json.loads(json.dumps(data or TINY))
    data.update(top)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def cfg(tmp_path):
    return write_cfg(tmp_path / "c.yaml", out_dir=str(tmp_path / "runs"))


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *args, match=()):
    """The command fails with exit code 2 and exactly one line ``kbricks: error: ...`` naming the problem."""
    rc, out, err = run_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("kbricks: error: "), err
    for m in (match if isinstance(match, (list, tuple)) else [match]):
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    return lines[0]


def weights(run: Path):
    return load_checkpoint(run / "ckpt" / "last.pt")["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def worker(marker: Path, epoch: int, step: int, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    # SIGINT at its default in the child: an ignored SIGINT (set by an earlier test's tooling) would be inherited
    return subprocess.Popen([sys.executable, WORKER, str(marker), str(epoch), str(step), "--", *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("worker never reached its pause point")
        time.sleep(0.05)
    time.sleep(0.05)
    return int(marker.read_text())


# A user's own dataset with every kind of bad data the issue lists.
@DATASETS.register("robust_bad")
def robust_bad(kind: str = "ok") -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(80, 1, 8, 8, generator=g), torch.arange(80) % 4
    xt, yt = torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 4
    classes = ["a", "b", "c", "d"]
    if kind == "negative":
        y[3] = -1
    elif kind == "huge":
        yt[0] = 1_000_000
    elif kind == "float":
        y = y.float() + 0.5
    elif kind == "empty_test":
        xt, yt = xt[:0], yt[:0]
    elif kind == "empty_train":
        x, y = x[:0], y[:0]
    elif kind == "nan_test":
        xt[:] = float("nan")
    elif kind == "inf_train":
        x[7, 0, 2, 2] = float("inf")
    elif kind == "gaps":  # labels 0, 5, 10, 15 of 16 declared classes
        y, yt, classes = y * 5, yt * 5, [str(i) for i in range(16)]
    elif kind == "shape":
        xt = torch.rand(40, 1, 7, 7, generator=g)
    elif kind == "classes":
        return DataSplits(ArrayDataset(x, y, classes), ArrayDataset(xt, yt, classes[::-1]), name="robust_bad")
    return DataSplits(ArrayDataset(x, y, classes), ArrayDataset(xt, yt, classes), name="robust_bad")


def bad_data_cfg(tmp_path, kind):
    data = dict(TINY, data={"name": "robust_bad", "kwargs": {"kind": kind}}, train={**TINY["train"], "batch_size": 16})
    return write_cfg(tmp_path / f"{kind}.yaml", data, out_dir=str(tmp_path / "runs"))


# ---- data lost: concurrency, kill -9, SIGINT --------------------------------------------------------------------

EPOCHS3 = ("-o", "train.epochs=3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run: what every interrupted and resumed run must equal bit for bit."""
    d = tmp_path_factory.mktemp("ref")
    cfg = write_cfg(d / "c.yaml")
    assert main(["train", str(cfg), "--run-dir", str(d / "run"), *EPOCHS3]) == 0
    return cfg, d / "run"


def test_second_process_on_a_running_dir_is_refused_then_kill9_resumes_bit_identical(reference, tmp_path, capsys):
    cfg, ref = reference
    run, marker = tmp_path / "run", tmp_path / "paused"
    proc = worker(marker, 2, 2, "train", cfg, "--run-dir", run, *EPOCHS3)
    try:
        pid = wait_for(marker, proc)
        before = (run / "ckpt" / "last.pt").read_bytes()
        for extra in ([], ["--resume"], ["--overwrite"]):
            one_line_error(capsys, "train", cfg, "--run-dir", run, *EPOCHS3, *extra, match=[f"is in use by pid {pid}", str(run)])
        assert (run / "ckpt" / "last.pt").read_bytes() == before  # the running run lost nothing
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 mid-epoch 2: the OS drops the lock
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert load_checkpoint(run / "ckpt" / "last.pt")["epoch"] == 1
    rc, out, _ = run_cli(capsys, "train", cfg, "--run-dir", run, "--resume", *EPOCHS3)
    assert rc == 0 and json.loads(out)["epochs"] == 3
    assert same_weights(run, ref)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(run / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(ref / "metrics.jsonl")]


def test_sigint_names_the_run_dir_and_resume_is_bit_identical_while_a_run_of_the_same_second_gets_its_own_dir(
        reference, tmp_path, capsys, monkeypatch):
    from kbricks.core import rundir

    cfg, ref = reference
    out_dir, marker, stamp = tmp_path / "out", tmp_path / "paused", "20240101-000000"
    # no --run-dir: the generated name must be unique and the SIGINT message must name it (not a placeholder)
    monkeypatch.setenv("ROBUST_STAMP", stamp)
    proc = worker(marker, 2, 1, "train", cfg, "-o", f"out_dir={out_dir}", *EPOCHS3)
    try:
        wait_for(marker, proc)
        # a second process (this one) starts a run "in the same second" while the first is training
        monkeypatch.setattr(rundir, "_stamp", lambda: stamp)
        rc, out, _ = run_cli(capsys, "train", cfg, "-o", f"out_dir={out_dir}")
        assert rc == 0 and json.loads(out)["run_dir"] == str(out_dir / "robust" / f"{stamp}-seed0-2")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    run = out_dir / "robust" / f"{stamp}-seed0"
    assert proc.returncode == 130 and "Traceback" not in err
    assert f"kbricks: interrupted; resume with --resume --run-dir {run}" in err
    assert run_cli(capsys, "train", "--resume", "--run-dir", run, *EPOCHS3)[0] == 0
    assert same_weights(run, ref)
    assert [r["epoch"] for r in read_jsonl(out_dir / "robust" / f"{stamp}-seed0-2" / "metrics.jsonl")] == [1]


def test_lock_is_released_after_a_run_and_after_a_failure(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--run-dir", run)[0] == 0
    assert run_cli(capsys, "train", cfg, "--run-dir", run, "--resume", "-o", "train.epochs=2")[0] == 0
    one_line_error(capsys, "train", cfg, "--run-dir", run, "--resume", "-o", "model.kwargs.hidden=[8]", match="different 'model'")
    assert run_cli(capsys, "train", cfg, "--run-dir", run, "--resume", "-o", "train.epochs=3")[0] == 0


# ---- data lost: refused resumes write nothing ------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("model.kwargs.hidden=[8]", "different 'model' config"),
    ("seed=1", "different 'seed' config"),
    ("data.train_subset=64", "different 'data' config"),
    ("method.label_smoothing=0.1", "different 'method' config"),
    ("optim.name=adam", "optim.name changed from 'sgd' to 'adam'"),
    ("optim.schedule=cosine", "optim.schedule changed"),
])
def test_refused_resume_leaves_the_run_untouched(cfg, tmp_path, capsys, override, match):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--run-dir", run)[0] == 0
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    one_line_error(capsys, "train", cfg, "--run-dir", run, "--resume", "-o", override, "-o", "train.epochs=2", match=match)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files
    # and a plain resume with the run's own config.yaml still works
    rc, out, _ = run_cli(capsys, "train", "--resume", "--run-dir", run, "-o", "train.epochs=2")
    assert rc == 0 and json.loads(out)["epochs"] == 2


def test_continual_refused_resume_and_refused_restart_write_nothing(tmp_path, capsys):
    cfg, run = write_cfg(tmp_path / "cl.yaml", CONTINUAL), tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--run-dir", run)[0] == 0
    config = (run / "config.yaml").read_bytes()
    one_line_error(capsys, "train", cfg, "--run-dir", run, "--resume", "-o", "model.kwargs.hidden=[8]", match="different 'model' config")
    one_line_error(capsys, "continual", cfg, "--run-dir", run, match="already holds a run")
    assert (run / "config.yaml").read_bytes() == config
    assert run_cli(capsys, "continual", "--resume", "--run-dir", run)[0] == 0


def test_continual_failed_start_leaves_no_directory(tmp_path, capsys):
    bad = json.loads(json.dumps(CONTINUAL))
    bad["data"].update(name="robust_bad", kwargs={"kind": "nan_test"})
    cfg, run = write_cfg(tmp_path / "cl.yaml", bad), tmp_path / "run"
    one_line_error(capsys, "continual", cfg, "--run-dir", run, match="NaN or inf")
    assert not run.exists()


def test_run_dir_whose_ckpt_was_deleted_is_not_overwritten_silently(cfg, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--run-dir", run)[0] == 0
    shutil.rmtree(run / "ckpt")
    metrics = (run / "metrics.jsonl").read_bytes()
    one_line_error(capsys, "train", cfg, "--run-dir", run, match="already holds a run")
    one_line_error(capsys, "train", cfg, "--run-dir", run, "--resume", match="holds results but no checkpoint")
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert run_cli(capsys, "train", cfg, "--run-dir", run, "--overwrite")[0] == 0
    assert (run / "ckpt" / "last.pt").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run(cfg, tmp_path, capsys):
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "config.yaml").write_text("my own config")
    (proj / "notes.txt").write_text("precious")
    one_line_error(capsys, "train", cfg, "--run-dir", proj, "--overwrite", match="does not look like a kbricks run directory")
    assert sorted(p.name for p in proj.iterdir()) == ["config.yaml", "notes.txt"] and (proj / "notes.txt").read_text() == "precious"


def test_resume_and_overwrite_together_are_refused(cfg, tmp_path, capsys):
    one_line_error(capsys, "train", cfg, "--run-dir", tmp_path / "r", "--resume", "--overwrite", match="contradict")
    assert not (tmp_path / "r").exists()


def test_resume_of_a_start_killed_before_its_first_epoch_starts_afresh(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.read_text())  # what a kill -9 during data loading leaves
    (run / "env.json").write_text("{}")
    assert run_cli(capsys, "train", cfg, "--run-dir", run, "--resume")[0] == 0
    assert load_checkpoint(run / "ckpt" / "last.pt")["epoch"] == 1


# ---- data lost: failed starts leave nothing half-made -----------------------------------------------------------


def test_failed_start_in_a_new_run_dir_removes_it(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    one_line_error(capsys, "train", bad_data_cfg(tmp_path, "huge"), "--run-dir", run, match="label 1000000 is out of range")
    assert not run.exists()


def test_failed_start_with_a_default_name_leaves_nothing(tmp_path, capsys):
    one_line_error(capsys, "train", bad_data_cfg(tmp_path, "negative"), match="label -1")
    assert not (tmp_path / "runs" / "robust").exists()


def test_failed_start_in_an_existing_empty_dir_leaves_it_empty(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    one_line_error(capsys, "train", bad_data_cfg(tmp_path, "negative"), "--run-dir", run, match="label -1")
    assert list(run.iterdir()) == []
    # so the next, fixed attempt is not refused as "already holds a run"
    assert run_cli(capsys, "train", bad_data_cfg(tmp_path, "ok"), "--run-dir", run)[0] == 0


def test_interrupt_before_the_first_checkpoint_cleans_up_and_says_so(cfg, tmp_path, capsys, monkeypatch):
    from kbricks.engine.trainer import Loop

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Loop, "run_epoch", interrupted)
    rc, _, err = run_cli(capsys, "train", cfg, "--run-dir", tmp_path / "run")
    assert rc == 130 and "Traceback" not in err
    assert "stopped before the first checkpoint: nothing to resume" in err and not (tmp_path / "run").exists()


# ---- data lost: assemble --out --------------------------------------------------------------------------------


def test_assemble_refuses_to_overwrite_an_assembly(kf_bricks, tmp_path, capsys):
    _, b = kf_bricks
    args = ["assemble", b / "ckn.json", b / "tsn-classes_0-1-2-3-4.json", "--out", tmp_path / "asm"]
    assert run_cli(capsys, *args)[0] == 0
    first = (tmp_path / "asm" / "assembled.json").read_bytes()
    one_line_error(capsys, *args[:3], b / "tsn-classes_5-6-7-8-9.json", *args[3:], match="already holds an assembled network")
    assert (tmp_path / "asm" / "assembled.json").read_bytes() == first
    assert run_cli(capsys, *args[:3], b / "tsn-classes_5-6-7-8-9.json", *args[3:], "--overwrite")[0] == 0
    assert json.loads((tmp_path / "asm" / "assembled.json").read_text())["classes"] == list(range(10))


# ---- silently wrong: optimiser overrides on resume, NaN messages ----------------------------------------------


def test_lr_and_weight_decay_overrides_are_applied_on_resume(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--run-dir", run)[0] == 0
    rc, _, err = run_cli(capsys, "train", cfg, "--run-dir", run, "--resume", "-o", "train.epochs=2", "-o", "optim.lr=0.01",
                         "-o", "optim.weight_decay=0.001")
    assert rc == 0 and "resuming with optim.lr 0.1 -> 0.01, optim.weight_decay 0.0005 -> 0.001" in err
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["lr"] for r in rows] == [0.1, 0.01]  # the resumed epoch trained at the new lr
    state = load_checkpoint(run / "ckpt" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.01 and state["optimizer"]["param_groups"][0]["weight_decay"] == 0.001
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.01


def _poison(at_epoch):
    class Poison(Hook):
        def on_epoch_start(self, trainer, epoch):
            if epoch == at_epoch:
                with torch.no_grad():
                    next(trainer.method.parameters()).fill_(float("nan"))

    return Poison()


def _tiny(tmp_path, *over):
    from kbricks import build_config

    return build_config(TINY, ["train.epochs=2", *over])


def test_nan_with_no_checkpoint_says_there_is_none(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        run_training(_tiny(tmp_path), tmp_path / "run", hooks=[_poison(0)])
    msg = str(info.value)
    assert "at epoch 1, step 1" in msg and "no checkpoint was written yet (nothing to resume)" in msg
    assert "last good checkpoint" not in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_nan_names_the_checkpoint_and_a_lower_lr_resume_really_lowers_it(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=rf"last good checkpoint \(epoch 1\) is {run / 'ckpt' / 'last.pt'}: resume it with --resume -o optim.lr=<lower>"):
        run_training(_tiny(tmp_path), run, hooks=[_poison(1)])
    out = run_training(_tiny(tmp_path, "optim.lr=0.02"), run, resume=True)
    assert out["epochs"] == 2 and [r["lr"] for r in read_jsonl(run / "metrics.jsonl")] == [0.1, 0.02]


def test_nan_in_the_input_batch_blames_the_data_not_the_lr(tmp_path, monkeypatch):
    from kbricks.engine import experiment

    monkeypatch.setattr(experiment, "validate_splits", lambda s: s)  # a user bypassing the checks
    cfg = _tiny(tmp_path, "data.name=robust_bad", "data.kwargs={kind: inf_train}", "data.train_subset=null", "train.batch_size=80",
                "data.augment.normalize=false")
    with pytest.raises(TrainingDiverged) as info:
        run_training(cfg, tmp_path / "run")
    assert "the input batch itself holds NaN or inf values" in str(info.value) and "optim.lr" not in str(info.value)


# ---- silently wrong: bricks and teachers ------------------------------------------------------------------------


def _edit_brick(b: Path, out: Path, name: str, edit, resign=False) -> Path:
    import shutil

    from kbricks.methods.kf.bricks import signature

    out.mkdir(exist_ok=True)
    for f in b.iterdir():
        shutil.copy(f, out / f.name)
    m = json.loads((b / name).read_text())
    m = edit(m)
    if resign:
        m["fingerprint"] = signature(m["weights_fingerprint"], m)
    (out / name).write_text(json.dumps(m))
    return out


TSN_EDITS = [
    ("swapped-classes", lambda m: dict(m, task=dict(m["task"], classes=[6, 5, 7, 8, 9])), "signed fields"),
    ("permuted-class-names", lambda m: dict(m, class_names=["9", "8", "7", "6", "5"]), "signed fields"),
    ("other-architecture", lambda m: dict(m, architecture=dict(m["architecture"], dim=8)), "signed fields"),
    ("no-ckn_fingerprint", lambda m: {k: v for k, v in m.items() if k != "ckn_fingerprint"}, "lacks ['ckn_fingerprint']"),
    ("no-weights", lambda m: {k: v for k, v in m.items() if k != "weights"}, "lacks ['weights']"),
    ("weights-path", lambda m: dict(m, weights="../../etc/passwd"), "must name a file next to the manifest"),
]


@pytest.mark.parametrize("case, edit, match", TSN_EDITS, ids=[c[0] for c in TSN_EDITS])
def test_edited_tsn_manifests_are_refused(kf_bricks, tmp_path, capsys, case, edit, match):
    _, b = kf_bricks
    bad = _edit_brick(b, tmp_path / "b", "tsn-classes_5-6-7-8-9.json", edit)
    one_line_error(capsys, "assemble", bad / "ckn.json", bad / "tsn-classes_5-6-7-8-9.json", "--out", tmp_path / "asm", match=match)
    assert not (tmp_path / "asm").exists()


def test_signed_but_out_of_range_class_ids_are_refused(kf_bricks, tmp_path, capsys):
    _, b = kf_bricks
    bad = _edit_brick(b, tmp_path / "b", "tsn-classes_5-6-7-8-9.json", lambda m: dict(m, task=dict(m["task"], classes=[5, 6, 7, 8, 12])), resign=True)
    one_line_error(capsys, "assemble", bad / "ckn.json", bad / "tsn-classes_5-6-7-8-9.json", "--out", tmp_path / "asm",
                   match="are not 5 distinct ids in 0..9")


def test_ckn_manifest_missing_weights_is_refused(kf_bricks, tmp_path, capsys):
    _, b = kf_bricks
    bad = _edit_brick(b, tmp_path / "b", "ckn.json", lambda m: {k: v for k, v in m.items() if k != "weights"})
    one_line_error(capsys, "assemble", bad / "ckn.json", bad / "tsn-classes_5-6-7-8-9.json", "--out", tmp_path / "asm", match="lacks ['weights']")


def _teacher_copy(teacher: Path, tmp_path: Path) -> Path:
    import shutil

    t = tmp_path / "teacher"
    shutil.copytree(teacher, t)
    return t


def _kd_cfg(tmp_path, teacher):
    data = dict(TINY, method={"name": "kd", "teacher": str(teacher)})
    return write_cfg(tmp_path / "kd.yaml", data, out_dir=str(tmp_path / "runs"))


def test_teacher_with_modified_weights_is_refused(kf_bricks, tmp_path, capsys):
    t = _teacher_copy(kf_bricks[0], tmp_path)
    w = load_safetensors(t / "model.safetensors")
    k = next(iter(w))
    w[k] = w[k] * 1.01
    save_safetensors(w, t / "model.safetensors")
    one_line_error(capsys, "train", _kd_cfg(tmp_path, t), match="does not match the fingerprint")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


@pytest.mark.parametrize("content, match", [
    ("[1, 2, 3]", "not a kbricks model card"),
    ('{"model": {"name": "mlp"}}', "not a kbricks model card"),
    (b"\x80\x04\x95binary", "is not a JSON document"),
])
def test_teacher_model_json_that_is_not_a_card_is_refused(kf_bricks, tmp_path, capsys, content, match):
    t = _teacher_copy(kf_bricks[0], tmp_path)
    (t / "model.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(capsys, "train", _kd_cfg(tmp_path, t), match=match)


# ---- silently wrong: data validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, match", [
    ("negative", "train split: label -1 is out of range for its 4 classes"),
    ("huge", "test split: label 1000000 is out of range for its 4 classes"),
    ("float", "labels must be integer class indices, got non-integer values such as 0.5"),
    ("empty_test", "test split is empty (0 samples)"),
    ("empty_train", "train split is empty (0 samples)"),
    ("nan_test", "test split: 40 of 40 images hold NaN or inf values (first at index 0)"),
    ("inf_train", "train split: 1 of 80 images hold NaN or inf values (first at index 7)"),
    ("gaps", "12 of its 16 classes have no samples (classes 1..4, 6..9, 11..14)"),
    ("shape", "train images are (1, 8, 8) but test images are (1, 7, 7)"),
    ("classes", "the train and test splits declare different classes"),
])
def test_bad_labels_and_images_are_refused_before_a_model_is_built(tmp_path, capsys, monkeypatch, kind, match):
    from kbricks.models import MODELS

    built = []
    monkeypatch.setitem(MODELS._entries, "mlp", lambda **kw: built.append(kw))
    one_line_error(capsys, "train", bad_data_cfg(tmp_path, kind), match=match)
    assert built == [] and not (tmp_path / "runs" / "robust").exists()


def test_non_contiguous_labels_train_with_an_explicit_relabel(tmp_path, capsys):
    cfg = bad_data_cfg(tmp_path, "gaps")
    err = one_line_error(capsys, "train", cfg, match="set data.relabel: true to map the 4 labels present (0, 5, 10, 15) to 0..3")
    assert "relabel" in err
    rc, out, _ = run_cli(capsys, "train", cfg, "-o", "data.relabel=true")
    card = json.loads((Path(json.loads(out)["run_dir"]) / "model.json").read_text())
    assert rc == 0 and card["num_classes"] == 4 and card["classes"] == ["0", "5", "10", "15"]


def _npz(tmp_path, y_train, y_test, n=40):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=rng.random((len(y_train), 8, 8)).astype(np.float32), y_train=np.asarray(y_train),
             x_test=rng.random((len(y_test), 8, 8)).astype(np.float32), y_test=np.asarray(y_test))
    data = dict(TINY, data={"name": "npz", "root": str(p)}, train={**TINY["train"], "batch_size": 8})
    return write_cfg(tmp_path / "npz.yaml", data, out_dir=str(tmp_path / "runs"))


def test_npz_with_a_label_of_a_million_is_refused_without_building_a_huge_model(tmp_path, capsys):
    y = np.arange(40) % 10
    y_test = y.copy()
    y_test[0] = 1_000_000
    t0 = time.time()
    one_line_error(capsys, "train", _npz(tmp_path, y, y_test), match=["dataset 'npz'", "999990 of its 1000001 classes have no samples"])
    assert time.time() - t0 < 10 and not (tmp_path / "runs" / "robust").exists()


def test_npz_with_label_minus_one_is_refused(tmp_path, capsys):
    y = np.arange(40) % 10
    y[5] = -1
    one_line_error(capsys, "train", _npz(tmp_path, y, np.arange(20) % 10), match="label -1 is out of range")


def test_npz_with_zero_samples_is_refused(tmp_path, capsys):
    one_line_error(capsys, "train", _npz(tmp_path, np.zeros(0, np.int64), np.arange(20) % 10), match="npz d.npz: y_train holds 0 samples")


def test_cifar_labels_out_of_range_are_refused_naming_the_file(tmp_path, capsys):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, labels in (("data_batch_1", [0, 1, 2, 11]), ("test_batch", [0, 1, 2, 3])):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": labels}, f, protocol=2)
    data = dict(TINY, data={"name": "cifar10", "root": str(tmp_path)})
    one_line_error(capsys, "train", write_cfg(tmp_path / "c.yaml", data), match=[str(d / "data_batch_1"), "label 11 in 'labels' is not a class index 0..9"])


def test_imagefolder_with_an_empty_class_directory_is_refused(tmp_path, capsys):
    from PIL import Image

    for cls, n in (("cat", 6), ("dog", 6), ("emu", 0)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    data = dict(TINY, data={"name": "imagefolder", "root": str(tmp_path / "img"), "kwargs": {"grayscale": True, "test_fraction": 0.5}})
    one_line_error(capsys, "train", write_cfg(tmp_path / "c.yaml", data), match="1 of its 3 classes have no samples (classes 2)")


# ---- silently wrong: schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("optim.gamma=-0.1", "optim.gamma: Input should be greater than 0 (got -0.1)"),
    ("optim.gamma=0", "optim.gamma: Input should be greater than 0 (got 0)"),
    ("optim.gamma=1.5", "optim.gamma: Input should be less than or equal to 1 (got 1.5)"),
    ("optim.milestones=[5, 3]", "milestones must be strictly increasing"),
    ("optim.milestones=[0]", "milestones must be strictly increasing epoch numbers >= 1"),
])
def test_bad_schedules_are_refused(cfg, capsys, override, match):
    one_line_error(capsys, "train", cfg, "-o", "optim.schedule=step", "-o", override, match=match)


# ---- raw tracebacks -> one line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("override, match", [
    ("model.kwargs.hidden=abc", "model.kwargs.hidden: 'str' instances are not allowed"),
    ("model.kwargs.hidden=[a, 16]", "model.kwargs.hidden.0: input should be a valid integer"),
    ("model.kwargs.hidden=16", "model.kwargs.hidden: input should be an instance of Sequence"),
    ("model.kwargs.dropout='0.5'", "model.kwargs.dropout: input should be a valid number (got '0.5')"),
    ("model.kwargs.hidden=[-3]", "could not build model 'mlp'"),
    ("data.kwargs.split_seed=x", "data.kwargs.split_seed: input should be a valid integer"),
    ("data.kwargs.test_fraction=[0.2]", "data.kwargs.test_fraction: input should be a valid number"),
    ("data.kwargs.test_fraction=1.5", "test_fraction must be in (0, 1)"),
])
def test_wrong_types_in_kwargs_name_the_key(cfg, tmp_path, capsys, override, match):
    one_line_error(capsys, "train", cfg, "-o", override, "--run-dir", tmp_path / "r", match=match)
    assert not (tmp_path / "r").exists()


def test_user_model_with_untyped_arguments_fails_in_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "user_net.py").write_text(
        "from torch import nn\nfrom kbricks.models import MODELS\n\n"
        "@MODELS.register('user_net_robust')\n"
        "def user_net(num_classes=10, in_channels=1, image_size=8, width=None):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, width), nn.Linear(width, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = dict(TINY, model={"name": "user_net_robust", "kwargs": {"width": "wide"}})
    one_line_error(capsys, "--import", "user_net", "train", write_cfg(tmp_path / "c.yaml", data), "--run-dir", tmp_path / "r",
                   match=["could not build model 'user_net_robust'", "'width': 'wide'", "TypeError"])


@pytest.mark.parametrize("device, match", [
    ("tpu9", "train.device: unknown device 'tpu9'"),
    ("cuda:x", "train.device: unknown device 'cuda:x'"),
    ("meta", "unsupported device type 'meta'"),
])
def test_unknown_devices(cfg, capsys, device, match):
    one_line_error(capsys, "train", cfg, "-o", f"train.device={device}", match=match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(cfg, capsys):
    one_line_error(capsys, "train", cfg, "-o", "train.device=cuda", match="CUDA is not available on this machine")


def test_run_dir_that_is_a_file(cfg, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_line_error(capsys, "train", cfg, "--run-dir", tmp_path / "f", match="is a file, not a directory")
    one_line_error(capsys, "train", cfg, "--run-dir", tmp_path / "f" / "run", match="is not writable")
    one_line_error(capsys, "train", cfg, "-o", f"out_dir={tmp_path / 'f'}", match="out_dir: cannot create")
    assert (tmp_path / "f").read_text() == "x"


def test_unwritable_run_dir(cfg, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse the write the way a read-only directory would
        real = Path.write_text

        def read_only(self, *a, **k):
            if str(self).startswith(str(ro)):
                raise PermissionError(13, "Permission denied")
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", read_only)
    ro.chmod(0o500)
    try:
        one_line_error(capsys, "train", cfg, "--run-dir", ro, match="is not writable (Permission denied)")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_rank_environment_without_torchrun(cfg, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    one_line_error(capsys, "train", cfg, match=["RANK=0 WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT is not", "torchrun"])


def test_config_that_is_not_a_mapping_and_a_binary_config(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    one_line_error(capsys, "train", tmp_path / "list.yaml", match="top level must be a mapping")
    (tmp_path / "bin.yaml").write_bytes(b"\x00\x01\x02\xff")
    one_line_error(capsys, "train", tmp_path / "bin.yaml", match="bin.yaml")


# ---- misleading: file permissions -------------------------------------------------------------------------------


def test_weights_checkpoints_and_json_share_one_file_mode(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, "train", cfg, "--run-dir", run)[0] == 0
    finally:
        os.umask(old)
    modes = {f: stat.S_IMODE((run / f).stat().st_mode) for f in ("config.yaml", "env.json", "model.json", "results.json",
                                                              "model.safetensors", "ckpt/last.pt", "ckpt/best.pt")}
    assert set(modes.values()) == {0o644}, modes


def test_a_stale_temp_file_from_a_kill_mid_save_does_not_break_resume(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--run-dir", run)[0] == 0
    (run / "ckpt" / ".last.pt.abc123.tmp").write_bytes(b"torn half of a checkpoint")
    assert run_cli(capsys, "train", cfg, "--run-dir", run, "--resume", "-o", "train.epochs=2")[0] == 0
    assert load_checkpoint(run / "ckpt" / "last.pt")["epoch"] == 2


def test_validate_splits_is_usable_on_its_own():
    from kbricks.data.validate import validate_splits

    x = torch.rand(4, 1, 2, 2)
    with pytest.raises(DataError, match="label 7 is out of range"):
        validate_splits(DataSplits(ArrayDataset(x, torch.tensor([0, 1, 7, 1]), ["a", "b"]), ArrayDataset(x, torch.tensor([0, 1, 0, 1]), ["a", "b"]), "mine"))


def test_a_checkpoint_from_before_a_new_setting_still_resumes_but_a_changed_setting_does_not():
    """A setting added to the schema after a checkpoint was written reads as its default, not as a change."""
    from kbricks.config import parse_config
    from kbricks.engine.run import check_resumable

    cfg = parse_config({"data": {"name": "digits"}, "model": {"name": "mlp"}})
    old = cfg.to_dict()
    del old["data"]["relabel"]  # written by a version that did not know data.relabel
    check_resumable({"config": old}, cfg)
    changed = cfg.to_dict()
    changed["data"]["relabel"] = True
    with pytest.raises(CheckpointError, match="different 'data' config"):
        check_resumable({"config": changed}, cfg)

"""Issue 22, the engine's part: nothing silently wrong in what runs write and read back.

* every claim a model card or brick manifest makes is signed: a hand-edited field is refused with one line naming it;
* a resume with fewer epochs than already trained is refused (more epochs train on);
* ``kbricks evaluate`` on a read-only run directory is one line; run files are written atomically;
* a crash while saving an assembled network leaves no temporary files;
* SIGTERM ends a run as Ctrl-C does (checkpoint kept, "resume with ..." printed, exit status 143);
* N DDP ranks augment the global batch exactly as one process does;
* networks the Python API returns are in eval mode.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from kbricks.cli import main
from kbricks.core.checkpoint import load_checkpoint, sign_claims
from kbricks.core.hooks import read_jsonl
from kbricks.errors import CheckpointError

WORKER = os.path.join(REPO, "tests", "robust_worker.py")
SRC = os.path.join(REPO, "src")

TINY = {
    "name": "trust",
    "data": {"name": "digits", "train_subset": 128},
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "optim": {"name": "sgd", "lr": 0.1, "schedule": "constant"},
    "train": {"epochs": 1, "batch_size": 32, "progress": "off", "plots": False},
}


def write_cfg(path: Path, data=None, **top) -> Path:
    data = json.loads(json.dumps(data or TINY))
    data.update(top)
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(capsys, *args, match=()):
    rc = main([str(a) for a in args])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("kbricks: error: "), err
    for m in (match if isinstance(match, (list, tuple)) else [match]):
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    return lines[0]


def copy_run(run: Path, dest: Path, edit=None) -> Path:
    shutil.copytree(run, dest)
    if edit is not None:
        card = json.loads((dest / "model.json").read_text())
        (dest / "model.json").write_text(json.dumps(edit(card), indent=2))
    return dest


# ---- 1. every claim of a card or manifest is signed ------------------------------------------------------------


def test_a_model_card_signs_every_claim_but_its_metrics(kf_bricks):
    from kbricks.models.card import UNSIGNED

    card = json.loads((kf_bricks[0] / "model.json").read_text())
    claims = {k: v for k, v in card.items() if k not in UNSIGNED}
    assert {"normalize", "classes", "num_classes", "in_channels", "image_size", "tasks", "model", "network", "imports"} <= set(claims)
    assert card["signature"] == sign_claims(claims, card["fingerprint"])
    assert set(card["claim_digests"]) == set(claims)


CARD_EDITS = [
    ("normalize", lambda c: dict(c, normalize={"mean": [0.0], "std": [1.0]})),
    ("classes", lambda c: dict(c, classes=c["classes"][::-1])),
    ("num_classes", lambda c: dict(c, num_classes=9)),
    ("in_channels", lambda c: dict(c, in_channels=3)),
    ("image_size", lambda c: dict(c, image_size=16)),
    ("tasks", lambda c: dict(c, tasks=[dict(c["tasks"][0], name="other")])),
    ("model", lambda c: dict(c, model=dict(c["model"], kwargs={"hidden": [16, 16]}))),
    ("network", lambda c: dict(c, network="dense")),
    ("input_shape", lambda c: dict(c, input_shape=[1, 16, 16])),  # a claim added by hand is refused too
]


@pytest.mark.parametrize("field, edit", CARD_EDITS, ids=[e[0] for e in CARD_EDITS])
def test_every_reader_refuses_a_hand_edited_card_naming_the_field(kf_bricks, tmp_path, field, edit):
    from kbricks.models.deploy import load_model
    from kbricks.models.open import load_trained_model

    run = copy_run(kf_bricks[0], tmp_path / "run", edit)
    expected = (f"{run / 'model.json'} was edited after it was written: {field!r} differs from what was signed; "
                "restore it or retrain")
    for load in (load_model, load_trained_model):
        with pytest.raises(CheckpointError) as info:
            load(run)
        assert str(info.value) == expected


def test_a_kd_teacher_with_edited_normalize_is_refused_in_one_line(kf_bricks, tmp_path, capsys):
    run = copy_run(kf_bricks[0], tmp_path / "teacher", lambda c: dict(c, normalize={"mean": [0.5], "std": [0.25]}))
    cfg = write_cfg(tmp_path / "kd.yaml", dict(TINY, method={"name": "kd", "teacher": str(run)}), out_dir=str(tmp_path / "runs"))
    one_line_error(capsys, "train", cfg, match="model.json was edited after it was written: 'normalize' differs from what was signed")


def test_edited_claims_with_edited_digests_still_do_not_match_their_signature(kf_bricks, tmp_path):
    from kbricks.core.checkpoint import claim_digests
    from kbricks.models.card import card_claims
    from kbricks.models.deploy import load_model

    def edit(card):
        card = dict(card, classes=["x"] * 10)
        return dict(card, claim_digests=claim_digests(card_claims(card)))

    run = copy_run(kf_bricks[0], tmp_path / "run", edit)
    with pytest.raises(CheckpointError, match=r"model.json: its claims do not match their signature \(edited or corrupt\); restore it or retrain$"):
        load_model(run)


def test_metrics_are_not_claims_and_an_unedited_copy_loads(kf_bricks, tmp_path):
    from kbricks.models.deploy import load_model

    run = copy_run(kf_bricks[0], tmp_path / "run", lambda c: dict(c, metrics={"note": "rounded by hand"}))
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(load_model(run)(x), load_model(kf_bricks[0])(x))


def test_a_card_written_before_signing_loads_with_one_warning(kf_bricks, tmp_path, capsys):
    from kbricks.models.deploy import load_model

    run = copy_run(kf_bricks[0], tmp_path / "run", lambda c: {k: v for k, v in c.items() if k not in ("signature", "claim_digests")})
    capsys.readouterr()
    load_model(run), load_model(run)
    err = capsys.readouterr().err
    assert err.count("has no signature (written before kbricks signed model cards)") == 1


def test_an_edited_brick_manifest_names_the_field(kf_bricks, tmp_path, capsys):
    bricks = tmp_path / "bricks"
    shutil.copytree(kf_bricks[1], bricks)
    tsn = sorted(bricks.glob("tsn-*.json"))[0]
    m = json.loads(tsn.read_text())
    tsn.write_text(json.dumps(dict(m, class_names=m["class_names"][::-1])))
    line = one_line_error(capsys, "assemble", bricks / "ckn.json", tsn, "--out", tmp_path / "asm")
    assert line == (f"kbricks: error: brick {tsn.name}: the manifest's signed fields ('class_names') were modified after export; "
                    "re-export the bricks instead of editing them")


def test_an_edited_assembled_json_names_the_field(kf_bricks, tmp_path):
    from kbricks.methods.kf.bricks import assemble, load_assembled, save_assembled

    b = kf_bricks[1]
    path = save_assembled(assemble(b / "ckn.json", sorted(b.glob("tsn-*.json"))), tmp_path / "asm")
    m = json.loads(path.read_text())
    path.write_text(json.dumps(dict(m, class_names=m["class_names"][::-1])))
    with pytest.raises(CheckpointError) as info:
        load_assembled(path.parent)
    assert str(info.value) == (f"assembled network {path}: the manifest was modified after it was written ('class_names' differs "
                               "from what was signed); assemble the bricks again instead of editing it")


def test_brick_signatures_are_unchanged_by_the_shared_signing_function(kf_bricks):
    """Bricks written before the signing moved to core still verify: the same hash of the same fields."""
    import hashlib

    from kbricks.methods.kf.bricks import SIGNED_FIELDS

    m = json.loads((kf_bricks[1] / "ckn.json").read_text())
    old = hashlib.sha256(m["weights_fingerprint"].encode())
    old.update(json.dumps({k: m.get(k) for k in SIGNED_FIELDS}, sort_keys=True, separators=(",", ":")).encode())
    assert m["fingerprint"] == old.hexdigest()[:16]


# ---- 2. resume with fewer epochs --------------------------------------------------------------------------------


def test_resume_with_fewer_epochs_than_trained_is_refused_and_more_epochs_train_on(tmp_path, capsys):
    cfg = write_cfg(tmp_path / "c.yaml")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "-o", "train.epochs=2"]) == 0
    before = {f: (run / f).read_bytes() for f in ("config.yaml", "results.json", "metrics.jsonl", "model.json")}
    line = one_line_error(capsys, "train", cfg, "--resume", "--run-dir", run, "-o", "train.epochs=1")
    assert line == ("kbricks: error: cannot resume: the run has already trained 2 epochs, more than train.epochs=1; "
                    "resume with train.epochs >= 2 (or start a new run)")
    assert {f: (run / f).read_bytes() for f in before} == before  # nothing rewritten
    assert main(["train", str(cfg), "--resume", "--run-dir", str(run), "-o", "train.epochs=3"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((run / "results.json").read_text())["epochs"] == 3 and load_checkpoint(run / "ckpt" / "last.pt")["epoch"] == 3


# ---- 3. evaluate on a read-only run directory; atomic run files -------------------------------------------------


def test_evaluate_on_a_read_only_run_dir_is_one_line(kf_bricks, tmp_path, capsys, monkeypatch):
    run = copy_run(kf_bricks[0], tmp_path / "run")
    assert main(["evaluate", str(run)]) == 0
    assert json.loads((run / "eval_last.json").read_text())["checkpoint"] == "last"
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    (run / "eval_last.json").unlink()
    capsys.readouterr()
    if os.geteuid() == 0:  # root writes anywhere: refuse the probe the way a read-only directory would
        from kbricks.core import io

        real = io.tempfile.mkstemp

        def read_only(*a, dir=None, **k):
            if dir is not None and Path(dir) == run:
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    run.chmod(0o500)
    try:
        line = one_line_error(capsys, "evaluate", run)
    finally:
        run.chmod(0o700)
    assert line == (f"kbricks: error: the run directory {str(run)!r} is not writable (Permission denied); "
                    "fix its permissions or write somewhere else")
    assert not (run / "eval_last.json").exists()


def test_csv_and_matrix_files_are_written_atomically(tmp_path, monkeypatch):
    """A crash while rewriting summary.csv or accuracy_matrix.csv leaves the previous file, never a torn one."""
    from kbricks.core import io
    from kbricks.core.hooks import write_csv
    from kbricks.engine.continual import write_matrix

    write_csv(tmp_path / "s.csv", [{"epoch": 1, "acc": 0.5}])
    write_matrix(tmp_path / "m.csv", [[0.5, None]], ["a", "b"])
    assert (tmp_path / "s.csv").read_text().splitlines() == ["epoch,acc", "1,0.5"]
    assert (tmp_path / "m.csv").read_text().splitlines() == ["after_task,a,b", "a,0.500000,"]

    def crash(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "write", crash)
    with pytest.raises(OSError, match="the disk is full"):
        write_csv(tmp_path / "s.csv", [{"epoch": 2, "acc": 0.7}])
    with pytest.raises(OSError, match="the disk is full"):
        write_matrix(tmp_path / "m.csv", [[0.9, 0.8]], ["a", "b"])
    monkeypatch.undo()
    assert (tmp_path / "s.csv").read_text().splitlines() == ["epoch,acc", "1,0.5"]
    assert (tmp_path / "m.csv").read_text().splitlines() == ["after_task,a,b", "a,0.500000,"]
    assert sorted(os.listdir(tmp_path)) == ["m.csv", "s.csv"]


# ---- 4. a crash while saving an assembled network ----------------------------------------------------------------


def _net(bricks: Path):
    from kbricks.methods.kf.bricks import assemble

    return assemble(bricks / "ckn.json", sorted(bricks.glob("tsn-*.json")))


def test_an_error_mid_save_leaves_nothing_and_an_existing_assembly_intact(kf_bricks, tmp_path, monkeypatch):
    from kbricks.methods.kf import bricks as bricks_module

    net, out = _net(kf_bricks[1]), tmp_path / "deploy" / "asm"
    real, written = bricks_module._write_file, []

    def crash_after_first(path, data):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        real(path, data)

    monkeypatch.setattr(bricks_module, "_write_file", crash_after_first)
    with pytest.raises(OSError, match="the disk is full"):
        bricks_module.save_assembled(net, out)
    assert os.listdir(tmp_path / "deploy") == []  # no directory, no hidden staging, no .tmp
    monkeypatch.undo()
    bricks_module.save_assembled(net, out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    written.clear()
    monkeypatch.setattr(bricks_module, "_write_file", crash_after_first)
    with pytest.raises(OSError):
        bricks_module.save_assembled(net, out, overwrite=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path / "deploy") == ["asm"]


KILLED_SAVE = """
import os, sys
from pathlib import Path
from kbricks.methods.kf import bricks
real = bricks._write_file
def killed(path, data):
    real(path, data)
    os._exit(9)  # like kill -9: no cleanup runs
bricks._write_file = killed
b = Path(sys.argv[1])
bricks.save_assembled(bricks.assemble(b / "ckn.json", sorted(b.glob("tsn-*.json"))), sys.argv[2])
"""


def test_kill_9_mid_save_leaves_no_visible_file_and_the_next_save_cleans_up(kf_bricks, tmp_path, capsys):
    out = tmp_path / "deploy" / "asm"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(kf_bricks[1]), str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 9, r.stderr[-2000:]
    left = os.listdir(tmp_path / "deploy")
    assert not out.exists() and len(left) == 1 and left[0].startswith(".asm.assembling-")  # hidden, half-written
    tsns = sorted(str(p) for p in kf_bricks[1].glob("tsn-*.json"))
    assert main(["assemble", str(kf_bricks[1] / "ckn.json"), *tsns, "--out", str(out)]) == 0
    assert os.listdir(tmp_path / "deploy") == ["asm"] and sorted(os.listdir(out)) == ["assembled.json", "assembled.safetensors"]


# ---- 5. SIGTERM -------------------------------------------------------------------------------------------------


def test_sigterm_keeps_the_checkpoint_says_how_to_resume_and_exits_143(tmp_path):
    cfg, run, marker = write_cfg(tmp_path / "c.yaml"), tmp_path / "run", tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    args = ["train", str(cfg), "--run-dir", str(run), "-o", "train.epochs=3"]
    proc = subprocess.Popen([sys.executable, WORKER, str(marker), "2", "1", "--", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        t0 = time.time()
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() - t0 < 120, "the worker never reached its pause point"
            time.sleep(0.05)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"kbricks: terminated (SIGTERM); resume with --resume --run-dir {run}"
    assert load_checkpoint(run / "ckpt" / "last.pt")["epoch"] == 1
    assert main([*args, "--resume"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_the_sigterm_handler_lives_only_as_long_as_the_run(tmp_path):
    from kbricks.engine.experiment import build_config
    from kbricks.engine.run import run_training

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        seen = []

        from kbricks.core.hooks import Hook

        class Look(Hook):
            def on_fit_start(self, state):
                seen.append(signal.getsignal(signal.SIGTERM))

        run_training(build_config(TINY, []), run_dir=tmp_path / "run", hooks=[Look()])
        assert seen and seen[0] is not mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- 6. DDP: one augmentation stream per global batch -----------------------------------------------------------


def _batches_seen(monkeypatch, rank: int, world: int, batch_size: int):
    """The augmented inputs ``Loop.run_epoch`` feeds the module, as rank ``rank`` of ``world`` (DDP simulated)."""
    from kbricks.config import OptimConfig, TrainConfig
    from kbricks.core import dist
    from kbricks.data import ArrayDataset, BatchAugment
    from kbricks.engine.loop import Loop

    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    monkeypatch.setattr(dist, "wrap_ddp", lambda module, device, **kw: module)  # no process group: the module itself
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            seen.append((batch.x.clone(), batch.y.clone()))
            return {"loss": self.w.sum() * 0 + batch.x.mean()}

    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(40, 1, 6, 6, generator=g), torch.arange(40) % 4, list("abcd"))
    module = Recorder()
    loop = Loop(module, list(module.parameters()), data, BatchAugment(crop_padding=2, hflip=True), OptimConfig(name="sgd", lr=0.1),
                TrainConfig(batch_size=batch_size, progress="off"), 2, torch.device("cpu"), (7,))
    loop.run_epoch(1)
    return seen


def test_ddp_ranks_together_see_exactly_the_augmented_batches_of_one_process(monkeypatch):
    one = _batches_seen(monkeypatch, 0, 1, 16)
    r0, r1 = _batches_seen(monkeypatch, 0, 2, 8), _batches_seen(monkeypatch, 1, 2, 8)
    assert len(one) == len(r0) == len(r1) == 2
    for (x, y), (x0, y0), (x1, y1) in zip(one, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_single_process_batches_are_unchanged_by_the_global_stream(monkeypatch):
    """One process draws exactly what it drew before: permutation from (seed, epoch), augmentation from
    (seed, epoch, 0, 1), batch after batch."""
    from kbricks.core.seeding import derive_seed, generator
    from kbricks.data import BatchAugment

    seen = _batches_seen(monkeypatch, 0, 1, 16)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 6, 6, generator=g)
    perm = torch.randperm(40, generator=generator(derive_seed(7, 1)))
    aug, t = generator(derive_seed(7, 1, 0, 1)), BatchAugment(crop_padding=2, hflip=True)
    for step, (got, _) in enumerate(seen):
        assert torch.equal(got, t(x[perm[step * 16:(step + 1) * 16]], train=True, generator=aug))


# ---- 7. networks the Python API returns are in eval mode --------------------------------------------------------


def test_run_model_is_in_eval_mode_and_calling_it_changes_nothing(tmp_path):
    import kbricks

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 1, 8, 8, generator=g), torch.arange(96) % 3
    run = kbricks.distill((x, y), method="supervised", student={"name": "small_cnn", "kwargs": {"widths": [4, 8]}}, epochs=1,
                          batch_size=32, run_dir=tmp_path / "run", progress="off")
    assert not run.model.training and not run.method.training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in run.model.modules())
    stats = {k: v.clone() for k, v in run.model.state_dict().items()}
    before = run.accuracy(x, y)
    with torch.no_grad():
        run.model(run.normalize(x * 3))  # a batch with other statistics
    assert run.accuracy(x, y) == before
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in stats.items())

"""Bad files and states (issue 22): each ends in a correct result or one line naming the problem and the fix, with
nothing lost and no temporary file left behind."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from kbricks.config import normalization_problem
from kbricks.core import io as kio
from kbricks.core.checkpoint import load_checkpoint, load_safetensors, load_state_into, save_checkpoint, save_safetensors
from kbricks.core.io import atomic_write_bytes, first_line, writable_dir
from kbricks.core.rundir import RunDirectory
from kbricks.data import cache
from kbricks.data.base import to_nchw
from kbricks.data.inmemory import python_splits
from kbricks.errors import CheckpointError, DataError, KbricksError, StorageError
from kbricks.models.deploy import InputNormalization, input_normalization


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- one atomic write, one first line ----------------------------------------------------------------------------


def test_atomic_write_replaces_fsyncs_file_and_directory_and_leaves_nothing_on_interrupt(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(kio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old" and len(synced) == 2  # the file, then its directory
    atomic_write_bytes(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, interrupted)
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []


def test_dataset_cache_writes_through_the_same_fsynced_atomic_write(tmp_path, monkeypatch):
    monkeypatch.setenv("KBRICKS_CACHE", str(tmp_path))
    calls = []
    real = kio.atomic_write_bytes
    monkeypatch.setattr(cache, "atomic_write_bytes", lambda *a, **k: (calls.append(a[0].name), real(*a, **k)))
    out = cache.cached_arrays("k", lambda: {"x": np.arange(3)}, version="1")
    assert calls == ["k.npz", "k.json"] and out["x"].tolist() == [0, 1, 2]
    assert leftovers(tmp_path) == []


def test_first_line_keeps_one_line_without_cpp_location():
    assert first_line(RuntimeError("first\nsecond")) == "first"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("bad\nmore"), with_type=True) == "ValueError: bad"
    assert first_line(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")) == "unexpected pos 768 vs 662"
    assert first_line(RuntimeError("[1, 2] is not a shape")) == "[1, 2] is not a shape"  # not a source location
    assert len(first_line(RuntimeError("x" * 1000), 50)) == 50


# ---- checkpoints: full disk, unwritable directory, wrong dtypes ---------------------------------------------------


def test_checkpoint_save_on_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    room = [700]  # like a real full disk: a short write, then ENOSPC (torch alone reports "unexpected pos 768 vs 662")
    real_write = os.write

    def full(fd, data):
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[:room[0]]))
        room[0] -= n
        return n

    monkeypatch.setattr(kio.os, "write", full)
    with pytest.raises(StorageError) as info:
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("the disk is full: cannot write the checkpoint")
    assert str(path) in msg and "free space on the disk holding" in msg and str(path.parent) in msg
    assert isinstance(info.value, KbricksError) and isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert leftovers(path.parent) == []


def test_checkpoint_directory_not_writable_names_the_directory(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    path.parent.mkdir()

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(kio.tempfile, "mkstemp", denied)
    with pytest.raises(StorageError, match="not writable") as info:
        save_checkpoint({"epoch": 1}, path)
    assert str(info.value) == (f"{str(path.parent)!r} is not writable: cannot write the checkpoint (Permission denied); "
                               "fix its permissions or write somewhere else")


def test_resume_refuses_an_unwritable_checkpoint_directory_before_training(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "ckpt").mkdir(parents=True)
    save_checkpoint({"epoch": 1}, run_dir / "ckpt" / "last.pt")
    (run_dir / "config.yaml").write_text("name: x\n")
    real = kio.tempfile.mkstemp

    def denied_in_ckpt(*a, dir=None, **k):
        if str(dir).endswith("ckpt"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(kio.tempfile, "mkstemp", denied_in_ckpt)
    with pytest.raises(StorageError) as info:
        RunDirectory.open(run_dir, "runs", "x", 0, resume=True)
    assert str(info.value) == (f"checkpoint directory {str(run_dir / 'ckpt')!r} is not writable (Permission denied); "
                               "fix its permissions or write somewhere else")
    assert (run_dir / "ckpt" / "last.pt").exists()  # nothing of the run was touched


def test_writable_dir_probe(tmp_path, monkeypatch):
    assert writable_dir(tmp_path / "new", "run directory") == tmp_path / "new"
    assert list((tmp_path / "new").iterdir()) == []  # the probe file is gone

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(kio.tempfile, "mkstemp", read_only)
    with pytest.raises(StorageError) as info:
        writable_dir(tmp_path, "run directory")
    assert str(info.value) == f"run directory {str(tmp_path)!r} is not writable (Read-only file system); fix its permissions or write somewhere else"


def test_run_files_on_a_read_only_run_dir_are_one_line(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path, created=False)
    monkeypatch.setattr(kio.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(StorageError, match="^'.*' is not writable: cannot write results.json \\(Read-only file system\\)"):
        run.write_json("results.json", {"a": 1})


def test_weights_of_another_dtype_are_refused_not_cast(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ints = {k: (v * 100).to(torch.int32) for k, v in net.state_dict().items()}  # right keys and shapes
    save_safetensors(ints, tmp_path / "w.safetensors")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_state_into(net, load_safetensors(tmp_path / "w.safetensors"), "teacher")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("checkpoint does not match the teacher: dtype mismatch in 4 tensor(s) ")
    assert "0.weight: checkpoint int32 vs model float32" in msg and "weights are never cast" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the network is untouched
    halves = {k: v.half() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match="checkpoint float16 vs model float32"):
        load_state_into(net, halves)
    load_state_into(net, {k: v + 1 for k, v in before.items()})  # same dtypes: loaded
    assert torch.equal(net[0].weight, before["0.weight"] + 1)


# ---- data: cache records, NaN in npz, NHWC arrays -----------------------------------------------------------------


@pytest.mark.parametrize("record", ["[1, 2, 3]", "42", "\"text\"", "{\"format\": 3", "\xff"])
def test_a_malformed_cache_record_is_rebuilt(tmp_path, monkeypatch, record):
    monkeypatch.setenv("KBRICKS_CACHE", str(tmp_path))
    built = []

    def build():
        built.append(1)
        return {"x": np.arange(4)}

    cache.cached_arrays("digits", build, version="1")
    (tmp_path / "digits.json").write_text(record)
    out = cache.cached_arrays("digits", build, version="1")
    assert len(built) == 2 and out["x"].tolist() == [0, 1, 2, 3]
    assert isinstance(json.loads((tmp_path / "digits.json").read_text()), dict)  # rewritten
    assert cache.cached_arrays("digits", build, version="1")["x"].tolist() == [0, 1, 2, 3] and len(built) == 2


@pytest.mark.parametrize("bad,kind", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_npz_with_nan_or_inf_names_the_values_not_a_scale(tmp_path, bad, kind):
    from kbricks.data import load_dataset

    x = np.random.default_rng(0).random((10, 4, 4)).astype(np.float32)
    x[3, 1, 2] = bad
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=np.arange(10) % 2)
    with pytest.raises(DataError) as info:
        load_dataset("npz", root=str(p))
    msg = str(info.value)
    assert msg == (f"npz d.npz: x: the array holds {kind} values (1 of 160, in 1 sample(s), first at index 3); "
                   "remove or repair those samples (kbricks never fills them in)")
    assert "scale" not in msg
    with pytest.raises(DataError, match=f"holds {kind} values"):
        load_dataset("npz", root=str(p), scale=2.0)


def test_to_nchw_converts_channels_last_once_with_a_warning():
    x = np.random.default_rng(0).random((5, 28, 28, 1)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"channels-last \[N, H, W, C\]; converted to \[N, C, H, W\] = \[5, 1, 28, 28\]"):
        y, converted = to_nchw(x, "training data")
    assert converted and y.shape == (5, 1, 28, 28) and np.array_equal(y[2, 0], x[2, :, :, 0])
    t = torch.rand(2, 6, 7, 3)
    with pytest.warns(UserWarning):
        u, converted = to_nchw(t, "x")
    assert converted and u.shape == (2, 3, 6, 7) and torch.equal(u[1, 2], t[1, :, :, 2])
    for shape in [(5, 1, 28, 28), (5, 3, 32, 32), (5, 1, 4, 4), (5, 16)]:  # NCHW (square reading wins), vectors
        a = np.zeros(shape)
        assert to_nchw(a, "x") == (a, False)
    assert to_nchw(np.zeros((2, 3, 8, 3)), "x", layout="NCHW")[1] is False
    assert to_nchw(np.zeros((2, 3, 8, 3)), "x", layout="NHWC")[0].shape == (2, 3, 3, 8)


@pytest.mark.parametrize("shape", [(2, 3, 8, 3), (2, 3, 3, 3), (2, 4, 4, 4)])
def test_to_nchw_refuses_to_guess_an_ambiguous_layout(shape):
    with pytest.raises(DataError) as info:
        to_nchw(np.zeros(shape), "training data inputs")
    assert str(info.value) == (f"training data inputs: images of shape {list(shape)} could be [N, C, H, W] or [N, H, W, C]; "
                               "say which (layout: NCHW or NHWC; in Python, pass x.permute(0, 3, 1, 2) for channels-last arrays)")


def test_python_data_in_nhwc_is_converted_like_the_npz_loader(tmp_path):
    from kbricks.data import load_dataset

    rng = np.random.default_rng(1)
    x, y = rng.random((40, 8, 6, 1)).astype(np.float32), np.arange(40) % 4
    with pytest.warns(UserWarning, match="channels-last"):
        splits = python_splits((x, y))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.warns(UserWarning, match="channels-last"):
        from_file = load_dataset("npz", root=str(tmp_path / "d.npz"))
    assert splits.train.x.shape[1:] == from_file.train.x.shape[1:] == (1, 8, 6)
    assert torch.equal(splits.train.x, from_file.train.x)  # same split, same conversion


# ---- input normalisation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("std,shown", [([float("nan")], "nan"), ([float("inf")], "inf"), ([0.0], "0.0"), ([0.3, -1.0], "-1.0")])
def test_unusable_normalisation_is_refused_in_one_line(std, shown):
    problem = normalization_problem([0.5] * len(std), std)
    assert problem == f"normalize: std must be finite positive numbers, got {shown} in {std}; give each channel's standard deviation"
    with pytest.raises(CheckpointError, match="^the network's input normalisation is unusable: normalize: std must be"):
        input_normalization({"mean": [0.5] * len(std), "std": std})
    assert normalization_problem([float("nan")], [1.0]).startswith("normalize: mean must be finite numbers, got nan")
    assert normalization_problem([0.1, 0.2], [0.3, 0.4, 0.5]) == "normalize: mean has 2 values but std has 3"
    assert normalization_problem([0.5], [0.25]) is None
    assert torch.allclose(InputNormalization([0.5], [0.25])(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))

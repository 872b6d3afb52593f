"""The embedded-dataset cache: parsed once, checksummed, rebuilt when missing, corrupt or outdated."""

import json

import numpy as np
import pytest
import torch

from kbricks.data import DATASETS
from kbricks.data.cache import cache_dir, cached_arrays


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KBRICKS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting_builder(values):
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(values, dtype=np.float32).reshape(-1, 2), "y": np.arange(values // 2)}

    return build, calls


def test_built_once_then_read_back(cache):
    build, calls = counting_builder(10)
    a = cached_arrays("toy", build, "1.0")
    b = cached_arrays("toy", build, "1.0")
    assert len(calls) == 1 and (cache / "toy.npz").exists()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in ("x", "y"))
    meta = json.loads((cache / "toy.json").read_text())
    assert meta["version"] == "1.0" and len(meta["sha256"]) == 64


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_meta", "new_version", "garbage_meta"])
def test_damaged_or_outdated_entries_are_rebuilt(cache, damage):
    build, calls = counting_builder(10)
    ref = cached_arrays("toy", build, "1.0")
    npz, meta = cache / "toy.npz", cache / "toy.json"
    version = "1.0"
    if damage == "flip_byte":
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        npz.write_bytes(bytes(data))
    elif damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:40])
    elif damage == "delete_meta":
        meta.unlink()
    elif damage == "garbage_meta":
        meta.write_text("{not json")
    else:
        version = "2.0"
    out = cached_arrays("toy", build, version)
    assert len(calls) == 2 and np.array_equal(out["x"], ref["x"])
    again = cached_arrays("toy", build, version)  # repaired: read back, not rebuilt
    assert len(calls) == 2 and np.array_equal(again["x"], ref["x"])


def test_disabled_or_unwritable_cache_still_gives_the_data(tmp_path, monkeypatch):
    build, calls = counting_builder(6)
    monkeypatch.setenv("KBRICKS_CACHE", "off")
    assert cache_dir() is None
    cached_arrays("toy", build)
    cached_arrays("toy", build)
    assert len(calls) == 2
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("KBRICKS_CACHE", str(blocker / "cache"))
    assert np.array_equal(cached_arrays("toy", build)["y"], np.arange(3))


def test_digits_from_the_cache_equal_a_fresh_parse(cache, monkeypatch):
    first = DATASETS.create("digits", split_seed=3)
    assert (cache / "digits.npz").exists()
    second = DATASETS.create("digits", split_seed=3)
    monkeypatch.setenv("KBRICKS_CACHE", "off")
    fresh = DATASETS.create("digits", split_seed=3)
    for a, b in ((first, fresh), (second, fresh)):
        assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y) and a.train.x.dtype == torch.float32

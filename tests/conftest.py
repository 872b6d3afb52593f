import atexit
import os
import shutil
import tempfile

import pytest
import torch

# one thread per pytest-xdist worker (make test runs one worker per core), else up to 2
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
os.environ.setdefault("KBRICKS_WORKERS", "1")  # library calls run their seeds in-process; test_parallel.py tests the pool
if "KBRICKS_CACHE" not in os.environ:  # parsed datasets go to a throw-away directory, not ~/.cache
    os.environ["KBRICKS_CACHE"] = tempfile.mkdtemp(prefix="kbricks-test-cache-")
    atexit.register(shutil.rmtree, os.environ["KBRICKS_CACHE"], True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_cfg():
    """A digits MLP config that trains in about a second."""
    from kbricks import build_config

    def make(**over):
        data = {
            "name": "tiny",
            "seed": 0,
            "data": {"name": "digits", "train_subset": 256},
            "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
            "optim": {"name": "sgd", "lr": 0.1},
            "train": {"epochs": 2, "batch_size": 32, "progress": "off", "plots": False},
        }
        return build_config(data, [f"{k}={v}" for k, v in over.items()])

    return make


@pytest.fixture(scope="module")
def kf_bricks(tmp_path_factory):
    """A finished one-epoch digits teacher run and a one-epoch KF run (two tasks) with it as teacher, through the CLI:
    (teacher run directory, bricks directory)."""
    import yaml

    from kbricks.cli import main

    d = tmp_path_factory.mktemp("kf")
    base = {"name": "tiny", "data": {"name": "digits", "train_subset": 256}, "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
            "optim": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
            "train": {"epochs": 1, "batch_size": 32, "progress": "off", "plots": False}}
    kf = dict(base, data={"name": "digits", "train_subset": 256, "tasks": {"split": 2}},
              method={"name": "kf", "teacher": str(d / "teacher"), "tsn": {"name": "mlp", "kwargs": {"hidden": [16]}}, "tsn_dim": 4})
    for name, cfg, run in (("t.yaml", base, "teacher"), ("kf.yaml", kf, "kf")):
        (d / name).write_text(yaml.safe_dump(cfg))
        assert main(["train", str(d / name), "--run-dir", str(d / run)]) == 0
    return d / "teacher", d / "kf" / "bricks"

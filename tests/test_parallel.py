"""Parallel single-threaded workers: one thread each, user registrations visible, results in order, failures raised."""

import json
import os

import pytest
import torch

from kbricks.engine.parallel import default_workers, run_parallel, worker_threads
from kbricks.errors import ConfigError


def probe(i, out_dir):
    from kbricks.core.seeding import default_threads
    from kbricks.models import MODELS

    info = {"i": i, "pid": os.getpid(), "threads": torch.get_num_threads(), "run_threads": default_threads(),
            "nested_workers": default_workers(8), "user_model": "parallel_probe_net" in MODELS}
    (out_dir / f"probe{i}.json").write_text(json.dumps(info))
    return info


def fail(message):
    raise ConfigError(message)


def test_workers_are_single_threaded_see_user_registrations_and_raise_the_first_failure(tmp_path, monkeypatch):
    (tmp_path / "probe_plugin.py").write_text(
        "from kbricks.models import MODELS\n@MODELS.register('parallel_probe_net')\ndef net(num_classes=10):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KBRICKS_THREADS", raising=False)
    monkeypatch.setenv("KBRICKS_WORKERS", "4")  # what a worker must not inherit
    import probe_plugin  # noqa: F401  (registered in this process only, as --import does)

    # the failing call is queued last: both probes have started (2 workers) and finish before the error is raised
    with pytest.raises(ConfigError, match="bad input in call 2"):
        run_parallel([(probe, (0, tmp_path), {}), (probe, (1, tmp_path), {}), (fail, ("bad input in call 2",), {})], workers=2)
    out = [json.loads((tmp_path / f"probe{i}.json").read_text()) for i in range(2)]
    assert os.getpid() not in {o["pid"] for o in out}
    assert all(o["threads"] == o["run_threads"] == worker_threads(2) for o in out)
    assert all(o["nested_workers"] == 1 for o in out)  # a sweep inside a worker does not start another pool
    assert all(o["user_model"] for o in out)
    # the next call reuses the same worker processes (a study's sweeps do not start Python again)
    again = run_parallel([(probe, (i, tmp_path), {}) for i in (3, 4, 5, 6)], workers=2)
    assert [o["i"] for o in again] == [3, 4, 5, 6]
    assert len({o["pid"] for o in out + again}) <= 2  # a new pool would have brought new processes


def test_one_worker_runs_in_order_here(tmp_path):
    out = run_parallel([(probe, (i, tmp_path), {}) for i in range(3)], workers=1)
    assert [o["i"] for o in out] == [0, 1, 2] and {o["pid"] for o in out} == {os.getpid()}


def test_worker_counts(monkeypatch):
    monkeypatch.setenv("KBRICKS_WORKERS", "3")
    assert default_workers(10) == 3 and default_workers(2) == 2
    monkeypatch.setenv("KBRICKS_THREADS", "2")
    assert worker_threads(4) == 2

"""DDP on CPU: 2 torchrun ranks (gloo) against 1 process with the doubled batch."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

WORKER = os.path.join(REPO, "tests", "dist_worker.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.distributed
def test_two_rank_ddp_matches_single_process_with_double_batch(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir(), single.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, str(ddp), "16"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, WORKER, str(single), "32"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    r0, r1 = (torch.load(ddp / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    one = torch.load(single / "rank0.pt", weights_only=True)
    assert r0["world"] == 2 and one["world"] == 1
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks diverged on {k}"
        assert torch.allclose(r0["params"][k], one["params"][k], atol=1e-5), f"DDP != single process on {k}"
    # sharded evaluation all-reduces counts: same accuracy as evaluating in one process
    assert abs(r0["final"]["test/acc"] - one["final"]["test/acc"]) < 1e-3
    # rank 0 alone wrote the run directory
    assert (ddp / "run" / "ckpt" / "last.pt").exists() and len(list((ddp / "run").glob("metrics.jsonl"))) == 1

"""How close are 2 DDP ranks (gloo, CPU) to 1 process with the doubled batch? Prints one row per network/option.

    python scripts/ddp_equivalence.py [--epochs 2] [--subset 512]

Each row trains digits with tests/dist_worker.py twice (torchrun with 2 ranks x batch 16, and 1 process x batch 32,
SGD lr 0.1 momentum 0.9, cosine schedule) and compares the final state dicts: parameters, BatchNorm running
statistics, and whether the two ranks hold identical parameters. The ``perturb`` row is the yardstick: one process
against itself with its initial weights perturbed by 1e-7, i.e. how far rounding-size differences grow in this
training on their own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
STATS = ("running_mean", "running_var", "num_batches_tracked")


def run(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])


def max_diff(a, b, keys):
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in keys), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=512)
    ap.add_argument("--rows", nargs="+", default=["mlp:nosync", "small_cnn:nosync", "small_cnn:sync", "small_cnn:perturb"],
                    help="network:sync|nosync|perturb")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    extra = [f"train.epochs={args.epochs}", f"data.train_subset={args.subset}", "train.num_threads=1"]  # same arithmetic in every process
    print(f"{args.epochs} epochs, {args.subset} training images")
    print("| network | compared | max abs diff, parameters | max abs diff, BN running stats | ranks identical | test acc (first / second) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for model, mode in (row.split(":") for row in args.rows):
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            first, one = Path(tmp, "first"), Path(tmp, "one")
            first.mkdir(), one.mkdir()
            if mode == "perturb":  # one process against itself with initial weights perturbed by 1e-7 (relative)
                run([sys.executable, str(WORKER), str(first), "32", model, "perturb", *extra], env)
                what, r1_path = "1 process, initial weights perturbed by 1e-7 vs 1 process", first / "rank0.pt"
            else:
                run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(first), "16", model, mode,
                     *extra], env)
                what, r1_path = f"2 ranks x 16, sync_batchnorm={mode == 'sync'} vs 1 process x 32", first / "rank1.pt"
            run([sys.executable, str(WORKER), str(one), "32", model, "nosync", *extra], env)
            r0, r1, s = (torch.load(p, weights_only=True) for p in (first / "rank0.pt", r1_path, one / "rank0.pt"))
        params = [k for k in s["params"] if not k.endswith(STATS)]
        stats = [k for k in s["params"] if k.endswith(STATS[:2])]
        same = max_diff(r0["params"], r1["params"], params) == 0
        print(f"| {model} | {what} | {max_diff(r0['params'], s['params'], params):.2e} | "
              f"{max_diff(r0['params'], s['params'], stats) if stats else float('nan'):.2e} | {same if mode != 'perturb' else '-'} | "
              f"{r0['final']['test/acc']:.4f} / {s['final']['test/acc']:.4f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Run by tests/test_dist.py, once under torchrun (2 ranks) and once as a plain process.

Trains a tiny network and writes each rank's own in-memory final parameters to OUT/rank<r>.pt.
Arguments: OUT BATCH_SIZE [MODEL [MODE [EXTRA_OVERRIDE ...]]], MODEL being mlp (no BatchNorm) or small_cnn, MODE
``sync`` (train.sync_batchnorm), ``nosync`` or ``perturb`` (no sync; the initial weights get a seeded relative
perturbation of 1e-7: how much the training itself amplifies rounding-size differences).
"""

import sys

import torch

from kbricks import build_config
from kbricks.core import dist
from kbricks.core.hooks import Hook
from kbricks.engine.run import run_training

out_dir, batch_size = sys.argv[1], int(sys.argv[2])
model = sys.argv[3] if len(sys.argv) > 3 else "mlp"
mode = sys.argv[4] if len(sys.argv) > 4 else "nosync"
sync_bn = mode == "sync"
extra = sys.argv[5:]
torch.set_num_threads(1)


class Perturb(Hook):
    def on_fit_start(self, trainer):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in trainer.method.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-7 * p.abs().clamp_min(1e-3))


class SaveParams(Hook):
    def on_fit_end(self, trainer, summary):
        state = {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}
        torch.save({"params": state, "final": summary["final"], "world": dist.world_size()}, f"{out_dir}/rank{dist.rank()}.pt")


kwargs = {"hidden": [32]} if model == "mlp" else {"widths": [8, 16]}
cfg = build_config({
    "name": "ddp",
    "data": {"name": "digits", "train_subset": 512, "augment": {"crop_padding": 0}},
    "model": {"name": model, "kwargs": kwargs},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "train": {"epochs": 2, "batch_size": batch_size, "progress": "off", "plots": False, "sync_batchnorm": sync_bn},
}, extra)
run_training(cfg, run_dir=f"{out_dir}/run", hooks=[SaveParams()] + ([Perturb()] if mode == "perturb" else []))
dist.shutdown()

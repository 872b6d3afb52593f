"""Run by tests/test_dist.py, once under torchrun (2 ranks) and once as a plain process.

Trains a tiny MLP and writes each rank's own in-memory final parameters to OUT/rank<r>.pt.
"""

import sys

import torch

from kbricks import build_config
from kbricks.core import dist
from kbricks.core.hooks import Hook
from kbricks.engine.trainer import run_training

out_dir, batch_size = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)


class SaveParams(Hook):
    def on_fit_end(self, trainer, summary):
        state = {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}
        torch.save({"params": state, "final": summary["final"], "world": dist.world_size()}, f"{out_dir}/rank{dist.rank()}.pt")


cfg = build_config({
    "name": "ddp",
    "data": {"name": "digits", "train_subset": 512, "augment": {"crop_padding": 0}},
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "train": {"epochs": 2, "batch_size": batch_size, "progress": "off", "plots": False},
})
run_training(cfg, run_dir=f"{out_dir}/run", hooks=[SaveParams()])
dist.shutdown()

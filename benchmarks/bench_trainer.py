"""The trainer vs a minimal hand-written loop on the same model and data.

``kbricks`` side: ``run_training`` end to end (dataset from the user cache, experiment, run directory, metrics,
checkpoint every epoch, export, plot). Minimal side: the same method, optimiser, schedule, augmentation and batches
in a bare loop over tensors already in memory, then one pass over the test set. Both evaluate once at the end
(``train.eval_every=0``); a second kbricks row evaluates every epoch (the default) against a minimal loop that does too.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
from common import clock

from kbricks import load_config
from kbricks.core.plots import wait_for_plots
from kbricks.core.seeding import derive_seed, generator
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_training
from kbricks.engine.trainer import make_optimizer, make_scheduler
from kbricks.methods import Batch
from kbricks.studies import configs_root


def minimal_loop(cfg, eval_every_epoch: bool):
    exp = build_experiment(cfg)  # not timed: a hand-written script has its model and tensors ready

    def accuracy():
        exp.method.eval()
        correct = 0
        with torch.no_grad():
            for s in range(0, len(exp.data.test), cfg.train.eval_batch_size):
                x = exp.transform(exp.data.test.x[s:s + cfg.train.eval_batch_size], train=False)
                correct += (exp.method.predict(x).argmax(1) == exp.data.test.y[s:s + cfg.train.eval_batch_size]).sum().item()
        exp.method.train()
        return correct / len(exp.data.test)

    def run():
        method, data, bs = exp.method.train(), exp.data.train, cfg.train.batch_size
        steps = len(data) // bs
        opt = make_optimizer(cfg.optim, method.trainable_parameters())
        sched = make_scheduler(cfg.optim, opt, cfg.train.epochs, steps)
        for epoch in range(cfg.train.epochs):
            perm = torch.randperm(len(data), generator=generator(derive_seed(cfg.seed, epoch)))
            aug = generator(derive_seed(cfg.seed, epoch, 0, 1))
            for step in range(steps):
                idx = perm[step * bs:(step + 1) * bs]
                batch = Batch(x=exp.transform(data.x[idx], train=True, generator=aug), y=data.y[idx], index=idx, raw=data.x[idx])
                loss = method.training_step(batch)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if eval_every_epoch or epoch == cfg.train.epochs - 1:
                accuracy()

    return run


def bench_config(name: str, config: str, overrides, rounds: int = 3) -> Dict[str, float]:
    now = clock()
    base = load_config(configs_root() / config, [*overrides, "train.progress=off", f"train.num_threads={torch.get_num_threads()}"])
    samples: Dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for label, eval_every in (("at the end", 0), ("every epoch", 1)):
                cfg = base.model_copy(deep=True)
                cfg.train.eval_every = eval_every
                run = minimal_loop(cfg, eval_every == 1)
                t0 = now()
                run()
                samples.setdefault(f"minimal loop, evaluation {label}", []).append(now() - t0)
                t0 = now()
                run_training(cfg, Path(tmp) / f"{label}-{r}")
                samples.setdefault(f"kbricks run_training, evaluation {label}", []).append(now() - t0)
        wait_for_plots()
    t = {k: statistics.median(v) for k, v in samples.items()}
    out: Dict[str, float] = {}
    print(f"\n== trainer vs minimal loop, {name} ({base.train.epochs} epochs, median of {rounds} rounds)")
    for label in ("at the end", "every epoch"):
        mine, ref = t[f"kbricks run_training, evaluation {label}"], t[f"minimal loop, evaluation {label}"]
        print(f"  evaluation {label:<12s} kbricks {mine:7.2f} s | minimal {ref:7.2f} s | ratio {mine / ref:.3f}x")
        out[f"minimal loop, evaluation {label}/ms"] = ref * 1e3
        out[f"minimal loop, evaluation {label}/ratio"] = 1.0
        out[f"kbricks run_training, evaluation {label}/ms"] = mine * 1e3
        out[f"kbricks run_training, evaluation {label}/ratio"] = mine / ref
    return out


def main():
    return {
        "digits teacher": bench_config("digits teacher (shipped config)", "teacher/digits_cnn.yaml", []),
        "mnist5k teacher": bench_config("MNIST-5k teacher, 3 epochs", "teacher/mnist5k_cnn.yaml", ["train.epochs=3"]),
    }


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"{time.time() - t:.0f} s")

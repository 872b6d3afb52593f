"""The trainer vs a plain-PyTorch training loop on the same model, data and optimiser settings.

kbricks side: ``run_training`` end to end (dataset from the user cache, experiment, run directory, metrics,
checkpoint every epoch, export), evaluating once at the end. Plain side: :func:`plain_loop`, ~15 lines of torch over
tensors already in memory (own shuffling and batching, the config's optimiser built in plain torch, cosine schedule,
plain CE), then one pass over the test set. Augmentation is off on both sides (``data.augment.crop_padding=0``), so
both do the same arithmetic. Plots are off on the kbricks side (``train.plots=false``): they are drawn in a
background thread, which the process CPU clock would charge to whichever side runs next; any plot still pending is
waited for inside kbricks' timed block. Each round runs both, alternating which goes first.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from common import clock, plain_optimizer, quick, report, rounds, summary

from kbricks import load_config
from kbricks.core.plots import wait_for_plots
from kbricks.engine.experiment import build_experiment
from kbricks.engine.run import run_training
from kbricks.models import create_model
from kbricks.studies import configs_root


def plain_loop(cfg, data):
    """A hand-written training script: model, the config's optimiser, cosine schedule, shuffled batches, CE; test
    accuracy at the end."""
    o = cfg.optim
    if o.schedule != "cosine" or o.warmup_epochs or o.scale_lr_with_world_size:
        raise ValueError(f"plain_loop writes a cosine schedule without warm-up; the config asks for {o.schedule!r}, "
                         f"{o.warmup_epochs} warm-up epochs: bench a cosine config")
    (x, y), (x_test, y_test) = data
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=int(y.max()) + 1, in_channels=x.shape[1], image_size=x.shape[-1], **cfg.model.kwargs)
    bs = cfg.train.batch_size
    steps = len(x) // bs if cfg.train.max_steps_per_epoch is None else min(len(x) // bs, cfg.train.max_steps_per_epoch)
    opt = plain_optimizer(o, model.parameters())
    total = cfg.train.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    for _ in range(cfg.train.epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return sum((model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item() for i in range(0, len(x_test), 1000)) / len(x_test)


def tensors(cfg):
    """The dataset's train/test tensors, normalised as the trainer sees them (not timed: a script has them ready)."""
    exp = build_experiment(cfg)
    norm = lambda d: (exp.transform(d.x, train=False), d.y)  # noqa: E731
    return norm(exp.data.train), norm(exp.data.test)


PLAIN, KBRICKS = "plain torch loop", "kbricks run_training"


def bench_config(name: str, config: str, overrides) -> dict:
    now = clock()
    # plots off: drawn in a background thread, they would land in the other side's CPU time (both sides do the same work)
    cfg = load_config(configs_root() / config, [*overrides, "data.augment.crop_padding=0", "train.eval_every=0", "train.plots=false",
                                                "train.progress=off", f"train.num_threads={torch.get_num_threads()}"])
    data = tensors(cfg)
    n = rounds(5)
    samples: Dict[str, list] = {PLAIN: [], KBRICKS: []}
    wall: Dict[str, list] = {PLAIN: [], KBRICKS: []}
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop(cfg, data)  # warm-up, not timed: the first torch calls of a process pay one-off set-up
        run_training(cfg.model_copy(deep=True), Path(tmp) / "warm-up")
        for r in range(n):
            order = (PLAIN, KBRICKS) if r % 2 == 0 else (KBRICKS, PLAIN)
            for who in order:
                t0, w0 = now(), time.perf_counter()
                if who == PLAIN:
                    plain_loop(cfg, data)
                else:
                    run_training(cfg.model_copy(deep=True), Path(tmp) / f"run-{r}")
                    wait_for_plots()  # none with plots off; any background work stays in kbricks' own time
                samples[who].append(now() - t0)
                wall[who].append(time.perf_counter() - w0)
    res = {who: {"ms": summary([1e3 * t for t in samples[who]]), "wall_ms": summary([1e3 * t for t in wall[who]]),
                 "ratio": summary([a / b for a, b in zip(samples[who], samples[PLAIN])])} for who in (PLAIN, KBRICKS)}
    return report(f"trainer vs plain torch loop, {name} ({cfg.train.epochs} epochs, {n} rounds)", res, PLAIN,
                  f"kbricks' run_training end to end ({name}, evaluation at the end) against a ~15-line plain torch loop "
                  "over in-memory tensors with the same model, optimiser, schedule and batches, both doing the same work "
                  "(no augmentation on either side; kbricks' plots off, since a background thread would charge them to the other side).")


def main():
    if quick():
        return {"digits teacher": bench_config("digits teacher, 1 epoch of 2 steps", "teacher/digits_cnn.yaml",
                                               ["train.epochs=1", "train.max_steps_per_epoch=2"])}
    return {
        "digits teacher": bench_config("digits teacher, 10 epochs", "teacher/digits_cnn.yaml", ["train.epochs=10"]),
        "mnist5k teacher": bench_config("MNIST-5k teacher, 1 epoch", "teacher/mnist5k_cnn.yaml", ["train.epochs=1"]),
    }


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"{time.time() - t:.0f} s")

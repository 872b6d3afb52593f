"""Accelerator options of the training loop (``train.precision``, ``train.channels_last``, ``train.compile``), each
as the time of 10 real ``Loop`` steps (shuffling, augmentation, forward, backward, optimiser) relative to fp32 eager
contiguous, on whatever device ``train.device=auto`` picks (CUDA when present)."""

from __future__ import annotations

from typing import Dict

import torch
from common import quick, report, time_rounds

from kbricks import load_config
from kbricks.engine.experiment import build_experiment
from kbricks.engine.trainer import Loop
from kbricks.studies import configs_root

OPTIONS = {
    "fp32 (default)": [],
    "bf16 autocast": ["train.precision=bf16"],
    "fp16 autocast": ["train.precision=fp16"],
    "channels_last": ["train.channels_last=true"],
    "torch.compile": ["train.compile=true"],
}


def loop_for(config: str, over) -> Loop:
    cfg = load_config(configs_root() / config, [*over, "train.max_steps_per_epoch=10"])
    exp = build_experiment(cfg)
    return Loop(exp.method, list(exp.method.trainable_parameters()), exp.data.train, exp.transform, cfg.optim, cfg.train,
                cfg.train.epochs, exp.device, (cfg.seed,))


def bench(name: str, config: str) -> Dict[str, float]:
    fns = {}
    for label, over in OPTIONS.items():
        if label == "torch.compile" and quick():
            continue  # a smoke run skips the minute of compilation
        if label == "fp16 autocast" and not torch.cuda.is_available():
            continue  # fp16 on CPU is emulated: not an accelerator there
        loop = loop_for(config, over)
        epoch = iter(range(10**6))
        fns[label] = lambda loop=loop, epoch=epoch: loop.run_epoch(next(epoch))
    res = time_rounds(fns, "fp32 (default)", inner=1, warmup=2)
    return report(f"accelerator options, {name}, 10 loop steps", res, "fp32 (default)",
                  f"Ten real training-loop steps ({name}) with each accelerator option, against fp32 eager on the same device.")


def main():
    if quick():
        return {"digits teacher": bench("digits teacher", "teacher/digits_cnn.yaml")}
    return {"digits teacher": bench("digits teacher", "teacher/digits_cnn.yaml"),
            "mnist5k teacher": bench("MNIST-5k teacher", "teacher/mnist5k_cnn.yaml")}


if __name__ == "__main__":
    main()

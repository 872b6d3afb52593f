"""KF training step vs its lower bound, and its growth with the number of tasks T.

Bound (issue 14): teacher forward without grad + CKN forward/backward + each TSN forward/backward on the same batch
(+ the same optimiser step over the same parameters). The KF step is the method's real ``training_step`` with the
shipped config's objective, backward and optimiser step. Both are timed interleaved in one process.

T tasks: digits ``split: T`` (T class groups); dSprites the first T of [shape, scale, orientation, pos_x, pos_y,
shape, scale, orientation] (T = 8 repeats three latents: the same cost as eight distinct ones).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from common import report, time_interleaved

from kbricks import load_config
from kbricks.engine.experiment import build_experiment
from kbricks.engine.trainer import make_optimizer, run_training
from kbricks.methods import Batch
from kbricks.studies import configs_root

LATENTS = ["shape", "scale", "orientation", "pos_x", "pos_y", "shape", "scale", "orientation"]
DATASETS = {  # teacher config, KF config, tasks override for T
    "digits": ("teacher/digits_cnn.yaml", "kf/digits.yaml", lambda t: f"data.tasks={{split: {t}}}"),
    "dsprites": ("teacher/dsprites_multihead.yaml", "kf/dsprites.yaml", lambda t: f"data.tasks={{latents: [{', '.join(LATENTS[:t])}]}}"),
}


def train_teacher(cfg: str, out: Path) -> Path:
    # timing does not depend on the teacher's quality: two steps give a real teacher run directory
    run_training(load_config(configs_root() / cfg, ["train.epochs=1", "train.progress=off", "train.plots=false",
                                                    "train.max_steps_per_epoch=2", f"train.num_threads={torch.get_num_threads()}"]), out)
    return out


def first_batch(exp, batch_size: int) -> Batch:
    train = exp.data.train
    raw = train.x[:batch_size].to(exp.device)
    return Batch(x=exp.transform(raw, train=True), y=train.y[:batch_size].to(exp.device),
                 latents=train.latents[:batch_size].to(exp.device) if train.latents is not None else None, raw=raw)


def kf_step(exp, batch: Batch, fused: bool = True):
    method = exp.method.train()
    opt = make_optimizer(exp.cfg.optim, method.trainable_parameters())

    def step():
        method.factors.fused = fused
        opt.zero_grad(set_to_none=True)
        method.training_step(batch)["loss"].backward()
        opt.step()

    return step


def bound_step(exp, batch: Batch):
    """Teacher forward (no grad) + CKN forward/backward + each TSN forward/backward, one by one, + the optimiser."""
    m = exp.method.train()
    factors = m.factors
    params = list(factors.parameters())
    opt = make_optimizer(exp.cfg.optim, params)
    x = batch.x

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            m.teacher(x)
        z_c = factors.ckn.features(x)
        z_c.square().mean().backward()
        z = z_c.detach()
        for tsn in factors.tsns:
            logits, mu, logvar, alone = tsn.forward_train(x, z, sample=True)
            (logits.square().mean() + mu.square().mean() + logvar.square().mean() + alone.square().mean()).backward()
        opt.step()

    return step


def build(dataset: str, teacher: Path, num_tasks: int, extra: Sequence[str] = ()):
    _, kf_cfg, tasks = DATASETS[dataset]
    cfg = load_config(configs_root() / kf_cfg, [f"method.teacher={teacher}", tasks(num_tasks), *extra])
    return build_experiment(cfg)


def bench_dataset(dataset: str, tmp: Path, tasks: Sequence[int] = (1, 2, 4, 8), batch_size: int = 64) -> Dict[str, Dict[str, float]]:
    teacher = train_teacher(DATASETS[dataset][0], tmp / f"teacher-{dataset}")
    out: Dict[str, Dict[str, float]] = {}
    steps: Dict[int, float] = {}
    for t in tasks:
        exp = build(dataset, teacher, t)
        batch = first_batch(exp, batch_size)
        fns = {"bound (teacher fwd + CKN fwd/bwd + each TSN fwd/bwd)": bound_step(exp, batch), "kf step (shipped objective)": kf_step(exp, batch),
               "kf step, TSNs one by one": kf_step(exp, batch, fused=False)}
        times = time_interleaved(fns)
        out[f"{dataset}, T={t}"] = report(f"KF step vs its bound, {dataset}, T={t}, batch {batch_size}", times, next(iter(fns)))
        steps[t] = times["kf step (shipped objective)"]
    return out


def main(datasets: List[str] = ("digits", "dsprites")):
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in datasets:
            out.update(bench_dataset(d, Path(tmp)))
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or ("digits", "dsprites"))

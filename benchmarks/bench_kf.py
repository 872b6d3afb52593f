"""KF training step vs its lower bound, and its growth with the number of tasks T.

Bound (issue 14): teacher forward without grad + CKN forward/backward + each TSN forward/backward on the same batch
(+ the same optimiser step over the same parameters). The KF step is the method's real ``training_step`` with the
shipped config's objective, backward and optimiser step. Both are timed interleaved in one process.

Growth with T (issue 14, goal 2) is timed in its own block, step(T=1) and step(T=8) interleaved, next to the work's
own growth: the FLOP ratio of the two steps (counted with torch's FlopCounterMode on the task-by-task path, the same
arithmetic as the fused bank). No implementation can beat that ratio unless the T=8 step runs more FLOPs per second.

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
from kbricks.engine.run import run_training
from kbricks.engine.trainer import make_optimizer
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
    """One training step of the experiment's method (forward, backward, optimiser); KF's TSNs fused or not."""
    method = exp.method.train()
    opt = make_optimizer(exp.cfg.optim, method.trainable_parameters())

    def step():
        if hasattr(method, "factors"):
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


BOUND = "bound (teacher fwd + CKN fwd/bwd + each TSN fwd/bwd)"
KF = "kf step (default objective, fused TSNs)"
KF_LOOP = "kf step, TSNs one by one"
KF_ONE_VIEW = "kf step, infomax_weight=0 (one CKN view)"


def bench_dataset(dataset: str, tmp: Path, tasks: Sequence[int] = (1, 2, 4, 8), batch_size: int = 64) -> Dict[str, Dict[str, float]]:
    teacher = train_teacher(DATASETS[dataset][0], tmp / f"teacher-{dataset}")
    out: Dict[str, Dict[str, float]] = {}
    for t in tasks:
        exp = build(dataset, teacher, t)
        one_view = build(dataset, teacher, t, ["method.infomax_weight=0"])
        batch = first_batch(exp, batch_size)
        fns = {BOUND: bound_step(exp, batch), KF: kf_step(exp, batch), KF_LOOP: kf_step(exp, batch, fused=False),
               KF_ONE_VIEW: kf_step(one_view, batch)}
        times = time_interleaved(fns)
        exp.method.factors.fused = True  # the label says what the default (fused) candidate ran as
        out[f"{dataset}, T={t}"] = report(f"KF step vs its bound, {dataset}, T={t}, batch {batch_size} ({exp.method.factors.fusion})",
                                          times, BOUND)
    return out


STEP_T1 = "kf step, T=1"
STEP_T8_LOOP = "kf step, T=8, TSNs one by one"
STEP_T8_FUSED = "kf step, T=8, fused bank"


def step_flops(exp, batch: Batch) -> float:
    """FLOPs of one KF training step (forward and backward), TSNs one by one."""
    from torch.utils.flop_counter import FlopCounterMode

    step = kf_step(exp, batch, fused=False)
    step()  # built lazily on the first call: count a steady step
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def bench_scaling(dataset: str, tmp: Path, batch_size: int = 64) -> Dict[str, float]:
    """step(T=8) / step(T=1), both timed in one interleaved block, next to the FLOP ratio of the two steps."""
    teacher = tmp / f"teacher-{dataset}"
    one, eight = build(dataset, teacher, 1), build(dataset, teacher, 8)
    b1, b8 = first_batch(one, batch_size), first_batch(eight, batch_size)
    flops = step_flops(eight, b8) / step_flops(one, b1)
    times = time_interleaved({STEP_T1: kf_step(one, b1), STEP_T8_LOOP: kf_step(eight, b8, fused=False),
                              STEP_T8_FUSED: kf_step(eight, b8)})
    out = report(f"KF step, T=8 vs T=1, {dataset}, batch {batch_size} (FLOP ratio T=8 / T=1: {flops:.2f}x)", times, STEP_T1)
    return out | {"flop ratio T=8 / T=1": flops, "ms per extra TSN, one by one": (times[STEP_T8_LOOP] - times[STEP_T1]) * 1e3 / 7,
                  "ms per extra TSN, fused bank": (times[STEP_T8_FUSED] - times[STEP_T1]) * 1e3 / 7}


def bench_bank(num_tasks: int = 8, batch_size: int = 64) -> Dict[str, float]:
    """The digits TSNs alone (forward + backward, codes at their means): task by task, torch.func.vmap over
    stacked parameters, and the fused channel-stacked bank."""
    from torch.func import functional_call, stack_module_state, vmap

    from kbricks.models import create_model
    from kbricks.models.factorized import FactorNetworks, TaskSpecificNetwork

    make = lambda: create_model("small_cnn", num_classes=0, in_channels=1, image_size=8, widths=[16, 32])  # noqa: E731
    tsns = [TaskSpecificNetwork(make(), 8, 64, 6, "concat") for _ in range(num_tasks)]
    factors = FactorNetworks(make(), tsns).train()
    x, z = torch.randn(batch_size, 1, 8, 8), torch.randn(batch_size, 64)
    params, buffers = stack_module_state(tsns)
    skeleton = TaskSpecificNetwork(make(), 8, 64, 6, "concat").to("meta")

    def one(p, b, x, z):
        return functional_call(skeleton, (p, b), (x, z, False))

    def run(fused: bool):
        def step():
            factors.fused = fused
            sum(t.sum() for col in factors.tsn_outputs(x, z, False) for t in col).backward()
        return step

    def vmapped():
        sum(t.sum() for t in vmap(one, in_dims=(0, 0, None, None))(params, buffers, x, z)).backward()

    times = time_interleaved({"task by task": run(False), "torch.func.vmap": vmapped, "fused bank (kbricks)": run(True)})
    return report(f"{num_tasks} digits TSNs alone, forward + backward, batch {batch_size}", times, "task by task")


def bench_optimizer(tmp: Path, num_tasks: int = 8) -> Dict[str, float]:
    """One SGD update over the digits KF parameters at T=8 (184 small tensors): torch's per-parameter loop, its
    foreach form, and the fused update make_optimizer picks."""
    exp = build("digits", tmp / "teacher-digits", num_tasks)
    params = list(exp.method.trainable_parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    fused = make_optimizer(exp.cfg.optim, params)
    o = exp.cfg.optim
    kw = dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    times = time_interleaved({"per-parameter loop (torch's CPU default)": torch.optim.SGD(params, **kw).step,
                              "foreach": torch.optim.SGD(params, foreach=True, **kw).step,
                              f"kbricks (fused={fused.param_groups[0].get('fused')})": fused.step}, inner=20)
    return report(f"SGD update, digits KF parameters at T={num_tasks} ({len(params)} tensors)", times,
                  "per-parameter loop (torch's CPU default)")


def main(datasets: List[str] = ("digits", "dsprites")):
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in datasets:
            out.update(bench_dataset(d, Path(tmp)))
            out[f"{d}, T=8 vs T=1"] = bench_scaling(d, Path(tmp))
        if "digits" in datasets:
            out["SGD update, T=8 parameters"] = bench_optimizer(Path(tmp))
    out["TSN bank alone, T=8"] = bench_bank()
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or ("digits", "dsprites"))
